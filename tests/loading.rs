//! Loading Hugging Face checkpoints: config.json validation, safetensors reading (names,
//! dtypes, every mismatch in one error), atomic saving, and — when PALS_MODEL_DIR points at
//! all-MiniLM-L6-v2 (scripts/fetch-minilm.sh) — the real checkpoint.

mod common;

use std::path::{Path, PathBuf};

use common::TempDir;
use pals::model::load::{LoadError, load_model_dir, load_weights, read_tensors, save_weights};
use pals::model::{BertConfig, HostTensor, Weights, param_shapes, random_weights};
use safetensors::tensor::{Dtype, TensorView};

fn tiny() -> BertConfig {
    BertConfig::tiny(2, 8, 2)
}

fn write_config(dir: &TempDir, config: &BertConfig) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
}

/// config.json for `tiny()` with one field replaced (None: removed).
fn config_with(dir: &TempDir, field: &str, value: Option<serde_json::Value>) -> PathBuf {
    let mut json = serde_json::to_value(tiny()).unwrap();
    let object = json.as_object_mut().unwrap();
    match value {
        Some(v) => object.insert(field.to_string(), v),
        None => object.remove(field),
    };
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    path
}

/// Writes tensors given as (name, dtype, shape, little-endian bytes).
fn write_raw(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (name.as_str(), TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `weights` as raw F32 tensors, renamed by `rename`.
fn raw_f32(weights: &Weights, rename: impl Fn(&str) -> String) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    weights.iter().map(|(n, t)| (rename(n), Dtype::F32, t.shape.clone(), f32_bytes(&t.data))).collect()
}

fn error_text(result: Result<impl std::fmt::Debug, LoadError>) -> (LoadError, String) {
    let error = result.expect_err("expected an error");
    let text = error.to_string();
    (error, text)
}

// ---- config.json -------------------------------------------------------------------------

#[test]
fn config_reads_a_hugging_face_file_and_ignores_unknown_fields() {
    let dir = TempDir::new("loading-config-ok");
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        r#"{"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu_python",
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
            "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "position_embedding_type": "absolute", "use_cache": true}"#,
    )
    .unwrap();
    let config = BertConfig::from_file(&path).unwrap();
    assert_eq!(config, BertConfig { hidden_act: "gelu_python".into(), ..BertConfig::minilm() });
    assert_eq!(config.head_dim(), 32);
}

#[test]
fn config_with_bad_json_names_file_line_and_column() {
    let dir = TempDir::new("loading-config-json");
    let path = dir.join("config.json");
    std::fs::write(&path, "{\n  \"hidden_size\": 8,\n  oops\n}\n").unwrap();
    let (error, text) = error_text(BertConfig::from_file(&path));
    assert!(matches!(error, LoadError::Json { line: 3, .. }), "{error:?}");
    assert!(text.contains("config.json") && text.contains("line 3, column"), "{text}");
}

#[test]
fn config_rejects_approximate_gelu_and_other_activations() {
    let dir = TempDir::new("loading-config-act");
    for act in ["gelu_new", "relu", "gelu_pytorch_tanh", "quick_gelu"] {
        let path = config_with(&dir, "hidden_act", Some(act.into()));
        let (error, text) = error_text(BertConfig::from_file(&path));
        assert!(
            matches!(&error, LoadError::Config { error, .. } if error.field == "hidden_act"),
            "{error:?}"
        );
        assert!(text.contains("config.json") && text.contains(act) && text.contains("erf"), "{text}");
    }
    let path = config_with(&dir, "hidden_act", Some("gelu".into()));
    assert_eq!(BertConfig::from_file(&path).unwrap(), tiny());
}

/// (field, replacement or None to remove, words the message must hold)
#[test]
fn config_errors_name_the_field() {
    let dir = TempDir::new("loading-config-fields");
    let cases: [(&str, Option<serde_json::Value>, &str); 7] = [
        ("hidden_size", Some(9.into()), "9 is not divisible by num_attention_heads = 2"),
        ("num_hidden_layers", Some(0.into()), "greater than 0"),
        ("intermediate_size", Some(0.into()), "greater than 0"),
        ("vocab_size", None, "missing"),
        ("hidden_size", Some("8".into()), "integer"),
        ("model_type", Some("roberta".into()), "not supported"),
        ("hidden_dropout_prob", Some(1.5.into()), "[0, 1)"),
    ];
    for (field, value, words) in cases {
        let path = config_with(&dir, field, value);
        let (error, text) = error_text(BertConfig::from_file(&path));
        assert!(
            matches!(&error, LoadError::Config { error, .. } if error.field == field),
            "{field}: {error:?}"
        );
        assert!(text.contains("config.json") && text.contains(field) && text.contains(words), "{text}");
    }
}

#[test]
fn missing_config_is_an_io_error_naming_the_file() {
    let dir = TempDir::new("loading-config-none");
    let (error, text) = error_text(load_model_dir(&dir.0));
    assert!(matches!(error, LoadError::Io { .. }) && text.contains("config.json"), "{text}");
}

// ---- model.safetensors -------------------------------------------------------------------

#[test]
fn save_then_load_round_trips_exactly_and_atomically() {
    let dir = TempDir::new("loading-round-trip");
    let config = tiny();
    let weights = random_weights(&config, 7);
    write_config(&dir, &config);
    let path = dir.join("model.safetensors");
    save_weights(&path, &random_weights(&config, 8)).unwrap();
    save_weights(&path, &weights).unwrap(); // overwrites
    let (loaded_config, loaded) = load_model_dir(&dir.0).unwrap();
    assert_eq!(loaded_config, config);
    assert_eq!(loaded, weights);
    assert_eq!(read_tensors(&path).unwrap(), weights);
    let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "temporary file left behind: {names:?}");

    // Checkpoints may hold more than the encoder: read_tensors keeps every tensor.
    let mut more = weights.clone();
    more.insert("head.0.weight".into(), HostTensor::new(&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    save_weights(&path, &more).unwrap();
    assert_eq!(read_tensors(&path).unwrap(), more);
}

#[test]
fn save_into_a_missing_directory_is_an_error_naming_the_file() {
    let dir = TempDir::new("loading-save-missing");
    let path = dir.join("no/such/dir/model.safetensors");
    let (error, text) = error_text(save_weights(&path, &random_weights(&tiny(), 1)));
    assert!(matches!(error, LoadError::Io { .. }) && text.contains("model.safetensors"), "{text}");
}

#[test]
fn f16_and_bf16_tensors_load_as_f32() {
    let dir = TempDir::new("loading-half");
    let config = tiny();
    let weights = random_weights(&config, 3);
    // Alternate F16 and BF16 across tensors, so one file holds both.
    let raw: Vec<_> = weights
        .iter()
        .enumerate()
        .map(|(i, (name, t))| {
            let (dtype, bytes): (Dtype, Vec<u8>) = if i % 2 == 0 {
                (Dtype::F16, t.data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect())
            } else {
                (Dtype::BF16, t.data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect())
            };
            (name.clone(), dtype, t.shape.clone(), bytes)
        })
        .collect();
    let path = dir.join("model.safetensors");
    write_raw(&path, &raw);
    let loaded = load_weights(&path, &config).unwrap();
    for (i, (name, t)) in weights.iter().enumerate() {
        let want: Vec<f32> = if i % 2 == 0 {
            t.data.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        } else {
            t.data.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
        };
        assert_eq!(loaded[name].data, want, "{name}");
        assert_eq!(loaded[name].shape, t.shape, "{name}");
    }
    // Exactly representable values come back exactly.
    let exact = [0.5f32, -1.25, 3.0, 0.0, -0.0078125, 256.0];
    let raw = [
        (
            "a".to_string(),
            Dtype::F16,
            vec![6],
            exact.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        ),
        (
            "b".to_string(),
            Dtype::BF16,
            vec![2, 3],
            exact.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        ),
    ];
    write_raw(&path, &raw);
    let read = read_tensors(&path).unwrap();
    assert_eq!(read["a"], HostTensor::new(&[6], exact.to_vec()));
    assert_eq!(read["b"], HostTensor::new(&[2, 3], exact.to_vec()));
}

#[test]
fn bert_prefix_gamma_beta_and_pretraining_heads_are_accepted() {
    let dir = TempDir::new("loading-names");
    let config = tiny();
    let weights = random_weights(&config, 5);
    let mut raw = raw_f32(&weights, |name| {
        let name =
            name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta");
        format!("bert.{name}")
    });
    // What a BertForPreTraining checkpoint carries besides the encoder.
    raw.push(("bert.embeddings.position_ids".into(), Dtype::I64, vec![1, 64], vec![0; 64 * 8]));
    raw.push(("cls.predictions.bias".into(), Dtype::F32, vec![50], f32_bytes(&[0.0; 50])));
    raw.push(("cls.seq_relationship.weight".into(), Dtype::F32, vec![2, 8], f32_bytes(&[0.0; 16])));
    let path = dir.join("model.safetensors");
    write_raw(&path, &raw);
    assert_eq!(load_weights(&path, &config).unwrap(), weights);

    // Plain names with gamma/beta, no prefix.
    let raw = raw_f32(&weights, |name| name.replace("LayerNorm.weight", "LayerNorm.gamma"));
    write_raw(&path, &raw);
    assert_eq!(load_weights(&path, &config).unwrap(), weights);
}

#[test]
fn missing_unexpected_and_misshaped_tensors_are_listed_in_one_error() {
    let dir = TempDir::new("loading-mismatch");
    let config = tiny();
    let mut weights = random_weights(&config, 9);
    weights.remove("encoder.layer.1.attention.self.key.bias");
    weights.insert("pooler.dense.bias".into(), HostTensor::zeros(&[7]));
    weights.insert("classifier.weight".into(), HostTensor::zeros(&[3, 8]));
    let path = dir.join("model.safetensors");
    let mut raw = raw_f32(&weights, |n| n.to_string());
    // Right shape, unsupported dtype.
    let ln = raw.iter_mut().find(|t| t.0 == "embeddings.LayerNorm.bias").unwrap();
    *ln = (ln.0.clone(), Dtype::I32, ln.2.clone(), vec![0; 8 * 4]);
    write_raw(&path, &raw);

    let (error, text) = error_text(load_weights(&path, &config));
    let LoadError::Mismatch { problems, .. } = &error else { panic!("{error:?}") };
    assert_eq!(problems.len(), 4, "{text}");
    assert!(text.contains("model.safetensors"), "{text}");
    for words in [
        ["missing", "encoder.layer.1.attention.self.key.bias", "[8]"],
        ["mis-shaped", "pooler.dense.bias", "expected [8], found [7]"],
        ["unexpected", "classifier.weight", "[3, 8]"],
        ["dtype", "embeddings.LayerNorm.bias", "I32"],
    ] {
        assert!(problems.iter().any(|p| words.iter().all(|w| p.contains(w))), "{words:?} not in\n{text}");
    }
}

#[test]
fn a_vocabulary_size_mismatch_is_reported_as_a_misshaped_embedding() {
    let dir = TempDir::new("loading-vocab");
    let weights = random_weights(&tiny(), 2);
    let path = dir.join("model.safetensors");
    save_weights(&path, &weights).unwrap();
    let config = BertConfig { vocab_size: 51, ..tiny() };
    let (_, text) = error_text(load_weights(&path, &config));
    assert!(text.contains("word_embeddings.weight: expected [51, 8], found [50, 8]"), "{text}");
}

#[test]
fn truncated_or_corrupt_files_are_errors_naming_the_file() {
    let dir = TempDir::new("loading-corrupt");
    let config = tiny();
    let path = dir.join("model.safetensors");
    save_weights(&path, &random_weights(&config, 4)).unwrap();
    let good = std::fs::read(&path).unwrap();

    let mut header_bad = 24u64.to_le_bytes().to_vec();
    header_bad.extend(b"{\"a\": not json at all }");
    let mut header_too_long = 1_000_000u64.to_le_bytes().to_vec();
    header_too_long.extend(b"{}");
    let cases: [(&str, Vec<u8>); 6] = [
        ("truncated in the data", good[..good.len() / 2].to_vec()),
        ("truncated in the header", good[..40].to_vec()),
        ("shorter than the length prefix", good[..5].to_vec()),
        ("empty", Vec::new()),
        ("header not JSON", header_bad),
        ("header length past the end", header_too_long),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let (error, text) = error_text(load_weights(&path, &config));
        assert!(matches!(error, LoadError::Safetensors { .. }), "{what}: {error:?}");
        assert!(text.contains("model.safetensors") && text.contains("corrupt"), "{what}: {text}");
        assert!(read_tensors(&path).is_err(), "{what}");
    }
}

#[test]
fn a_directory_with_only_pytorch_model_bin_explains_the_conversion() {
    let dir = TempDir::new("loading-pytorch");
    write_config(&dir, &tiny());
    std::fs::write(dir.join("pytorch_model.bin"), b"PK\x03\x04 not really").unwrap();
    let (error, text) = error_text(load_model_dir(&dir.0));
    assert!(matches!(error, LoadError::PytorchOnly { .. }), "{error:?}");
    for words in ["pytorch_model.bin", "safe_serialization=True", "safetensors.torch", "save_file"] {
        assert!(text.contains(words), "{words} not in {text}");
    }

    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    let (error, _) = error_text(load_model_dir(&dir.0));
    assert!(matches!(error, LoadError::NoWeights { .. }), "{error:?}");
}

// ---- the real checkpoint -----------------------------------------------------------------

#[test]
fn real_minilm_checkpoint_loads() {
    let Some(dir) = std::env::var_os("PALS_MODEL_DIR") else {
        eprintln!("PALS_MODEL_DIR not set: real-checkpoint test did not run");
        return;
    };
    let (config, weights) = load_model_dir(&dir).unwrap();
    assert_eq!(
        (config.num_hidden_layers, config.hidden_size, config.num_attention_heads),
        (6, 384, 12),
        "{config:?}"
    );
    assert_eq!((config.intermediate_size, config.vocab_size), (1536, 30522));
    let shapes = param_shapes(&config);
    assert_eq!(weights.len(), shapes.len());
    for (name, shape) in shapes {
        assert_eq!(weights[&name].shape, shape, "{name}");
        assert!(weights[&name].data.iter().all(|x| x.is_finite()), "{name}");
    }
    // LayerNorm scales of a trained model are far from their initial 1.0 somewhere.
    let gamma = &weights["embeddings.LayerNorm.weight"].data;
    assert!(gamma.iter().any(|&g| (g - 1.0).abs() > 0.05));
}
