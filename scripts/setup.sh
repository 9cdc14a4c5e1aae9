# The set-up shared by scripts/demo.sh and scripts/test.sh (and so by .ci/run): install
# only what is missing, build, and make sure wgpu finds an adapter.
#
# usage (sourced, from the repository root): . scripts/setup.sh PROFILE [TOOL...]
#   PROFILE  release or debug: the cargo profile to build; its `pals devices` checks the adapter
#   TOOL     other commands the caller needs (unzip, pip), installed when missing
#
# Linux: the Vulkan loader and Mesa's lavapipe (a CPU Vulkan driver) are installed only when
# no Vulkan driver is found, as root or through sudo, with apt-get. Without root, or without
# apt-get, it says exactly what to install and stops before building anything.
# macOS and Windows: Metal and DX12 come with the system, so there is no package step.
#
# PALS_SETUP_DRY_RUN=1 prints the package commands instead of running them.

set -euo pipefail

setup_profile="${1:?usage: . scripts/setup.sh release|debug [TOOL...]}"
shift
setup_tools="$*"
setup_vulkan_packages="mesa-vulkan-drivers libvulkan1"
# (No arrays: macOS runs this with bash 3.2.)

# The Debian/Ubuntu packages of a command; cc: tokenizers' regex engine (onig) is C.
package_of() {
    case "$1" in
    cc) echo "gcc libc6-dev" ;;
    pip) echo python3-pip ;;
    *) echo "$1" ;;
    esac
}

say() { echo "setup: $*" >&2; }

# A Vulkan driver manifest (ICD) and the loader: without both, no Vulkan adapter can exist.
has_vulkan_driver() {
    local ldconfig manifests="${VK_DRIVER_FILES:-${VK_ICD_FILENAMES:-}}"
    ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"
    "$ldconfig" -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || return 1
    if [ -n "$manifests" ]; then
        # The loader reads only these files then, not the standard folders.
        local file
        for file in ${manifests//:/ }; do
            [ -f "$file" ] && return 0
        done
        return 1
    fi
    compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null ||
        compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null ||
        compgen -G '/usr/local/share/vulkan/icd.d/*.json' >/dev/null
}

# Says what to install by hand, then stops: nothing has been changed yet.
stop_with_instructions() {
    local why="$1" packages="$2"
    say "$why"
    say "install these packages, then run this command again:"
    say "  Debian/Ubuntu:  apt-get install $packages"
    if [[ "$packages" == *mesa-vulkan-drivers* ]]; then
        say "  (Debian 12: add -t bookworm-backports for Mesa 25, which runs the kernels 3-8x faster)"
        say "  Fedora:         dnf install vulkan-loader mesa-vulkan-drivers"
        say "  Arch:           pacman -S vulkan-icd-loader vulkan-swrast"
    fi
    exit 1
}

# Debian 12's own Mesa is 22.3; bookworm-backports has Mesa 25 (3-8x faster on our kernels).
# Adds backports from the mirror the machine already uses; fails where there is none.
enable_backports() {
    local sources=/etc/apt/sources.list.d/debian.sources mirror
    grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release || return 1
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d && return 0
    if grep -qs '^Suites: bookworm bookworm-updates$' "$sources"; then
        $as_root sed -i 's/^Suites: bookworm bookworm-updates$/& bookworm-backports/' "$sources"
    elif mirror="$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)" &&
        [ -n "$mirror" ]; then
        echo "deb $mirror bookworm-backports main" | $as_root tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
    else
        return 1
    fi
}

# Installs the given Debian packages as root or through sudo, or stops and says how.
install_packages() {
    local packages="$*"
    command -v apt-get >/dev/null ||
        stop_with_instructions "no apt-get here, so nothing is installed automatically" "$packages"
    if [ "$(id -u)" = 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null && sudo -v; then
        as_root="sudo"
    else
        stop_with_instructions "installing packages needs root or sudo, and neither is available" "$packages"
    fi
    if [ "${PALS_SETUP_DRY_RUN:-0}" = 1 ]; then
        say "dry run, would run: ${as_root:+$as_root }apt-get update; ${as_root:+$as_root }apt-get install -y $packages"
        return 0
    fi
    say "installing $packages"
    local apt="$as_root env DEBIAN_FRONTEND=noninteractive apt-get"
    if enable_backports; then
        $apt update -q
        # Backports first; the release's own packages where backports lacks one.
        $apt install -y -q -t bookworm-backports $packages || $apt install -y -q $packages
    else
        $apt update -q
        $apt install -y -q $packages
    fi
}

# Whether the built binary finds an adapter (its exit status), with what it found. On Linux
# a Vulkan one: without a Vulkan driver wgpu falls back to Mesa's OpenGL (llvmpipe), where
# our kernels crawl (the demo's warm-up had not finished after 30 minutes).
adapter_found() {
    if [ "$(uname -s)" = Linux ]; then
        "target/$setup_profile/pals" devices --backend vulkan >&2
    else
        "target/$setup_profile/pals" devices >&2
    fi
}

setup_missing=""
setup_vulkan_installed=0
case "$(uname -s)" in
Linux)
    for tool in cc $setup_tools; do
        command -v "$tool" >/dev/null || setup_missing="$setup_missing $(package_of "$tool")"
    done
    if ! has_vulkan_driver; then
        say "no Vulkan driver found: the Vulkan loader and Mesa's lavapipe (CPU) will be installed"
        setup_missing="$setup_missing $setup_vulkan_packages"
        setup_vulkan_installed=1
    fi
    if [ -n "$setup_missing" ]; then
        install_packages $setup_missing
    fi
    ;;
Darwin | MINGW* | MSYS* | CYGWIN*)
    say "$(uname -s): Metal/DX12 need no packages, skipping the package step"
    ;;
*)
    say "$(uname -s): no package step for this system; building anyway"
    ;;
esac

# The loader complains (harmlessly) without a runtime dir.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

command -v cargo >/dev/null ||
    { say "cargo not found: install Rust first (rustup, see https://www.rust-lang.org/tools/install)"; exit 1; }
say "building ($setup_profile)"
if [ "$setup_profile" = release ]; then cargo build --release; else cargo build; fi

if ! adapter_found; then
    # A driver was there but gives no adapter (e.g. a GPU driver without its GPU): lavapipe.
    if [ "$(uname -s)" = Linux ] && [ "$setup_vulkan_installed" = 0 ]; then
        say "the Vulkan driver here gives no adapter: installing Mesa's lavapipe (CPU) as well"
        install_packages $setup_vulkan_packages
    fi
    adapter_found || { say "still no GPU adapter: see the error above"; exit 1; }
fi
