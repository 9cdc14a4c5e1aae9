//! The `pals` command line.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use pals::gpu::{AdapterChoice, Gpu};

#[derive(Parser)]
#[command(name = "pals", version, about = "BERT and PALs: multi-task BERT on any GPU through wgpu")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct AdapterArgs {
    /// Adapter index (from `pals devices`) or part of its name; default: the best one.
    #[arg(long, env = "PALS_ADAPTER", global = true)]
    adapter: Option<String>,
    /// Restrict to one backend: vulkan, metal, dx12 or gl.
    #[arg(long, env = "PALS_BACKEND", global = true)]
    backend: Option<String>,
}

impl AdapterArgs {
    fn open(&self) -> Result<Gpu> {
        let choice = AdapterChoice { adapter: self.adapter.clone(), backend: self.backend.clone() };
        Ok(Gpu::new(&choice)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every adapter wgpu finds: backend, type, driver, optional features, limits.
    Devices {
        #[command(flatten)]
        adapter: AdapterArgs,
    },
    /// Benchmark the kernels at BERT-base training shapes against a CPU BLAS.
    Bench {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Products per timed submit.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Instead: GFLOP/s of every matmul tile candidate on an M×N×K product (e.g. 1024x768x768).
        #[arg(long, value_name = "MxNxK")]
        tiles: Option<String>,
    },
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices { adapter } => devices(adapter.backend.as_deref()),
        Command::Bench { adapter, reps, tiles } => {
            let gpu = adapter.open()?;
            println!("adapter: {}", gpu.describe());
            if let Some(shape) = tiles {
                let dims: Vec<usize> =
                    shape.split('x').map(|d| d.trim().parse()).collect::<Result<_, _>>()?;
                let [m, n, k] = dims[..] else { anyhow::bail!("--tiles wants MxNxK, got '{shape}'") };
                let op = pals::kernels::matmul::Matmul::new(m, n, k).trans_b();
                for row in pals::bench::tile_report(&gpu, &op, reps)? {
                    println!("{row}");
                }
                return Ok(());
            }
            for row in pals::bench::matmul_report(&gpu, reps)? {
                println!("{row}");
            }
            for row in pals::bench::attention_report(&gpu)? {
                println!("{row}");
            }
            let tuning = *gpu.tune.spent.lock().unwrap();
            println!("tile tuning this run: {:.2} s", tuning.as_secs_f64());
            Ok(())
        }
    }
}

fn devices(backend: Option<&str>) -> Result<()> {
    let adapters = pals::gpu::list_adapters(backend)?;
    if adapters.is_empty() {
        anyhow::bail!(pals::gpu::GpuError::NoAdapter(String::new()));
    }
    for (index, adapter) in adapters.iter().enumerate() {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        let optional: Vec<&str> = pals::gpu::OPTIONAL_FEATURES
            .iter()
            .filter(|(f, _)| features.contains(*f))
            .map(|(_, name)| *name)
            .collect();
        println!("[{index}] {}", info.name);
        println!(
            "    backend {:?}, type {:?}, driver {} {}",
            info.backend, info.device_type, info.driver, info.driver_info
        );
        println!(
            "    features: {}",
            if optional.is_empty() { "none".to_string() } else { optional.join(", ") }
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, storage buffers per stage {}, \
             workgroup memory {} KiB, invocations per workgroup {}",
            limits.max_storage_buffer_binding_size >> 20,
            limits.max_buffer_size >> 20,
            limits.max_storage_buffers_per_shader_stage,
            limits.max_compute_workgroup_storage_size >> 10,
            limits.max_compute_invocations_per_workgroup
        );
    }
    Ok(())
}
