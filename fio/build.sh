#!/usr/bin/env bash
# Builds nvmirror's fio external ioengine, build/fio/libnvmirror_fio.so: the nvmirror-fio
# staticlib (the mirror engine) linked with engine/nvmirror.c, compiled against the headers of
# the fio this machine runs. Debian's fio source package is fetched through a private apt
# configuration under build/fio/ (the system's sources are not touched), unpacked and
# configured as Debian builds it; nothing from it is kept in the tree.
#
#   fio/build.sh            # prints the path of the .so
# Needs: fio (apt-get install fio), a C compiler, network access to deb.debian.org.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${CARGO_TARGET_DIR:-$root/build}/fio
mkdir -p "$out"
log() { echo "fio/build.sh: $*" >&2; }

command -v fio >/dev/null || { log "fio is not installed (apt-get install fio)"; exit 2; }
command -v cc >/dev/null || { log "no C compiler (apt-get install gcc)"; exit 2; }
ver=$(fio --version | sed -n 's/^fio-\([0-9.]*\).*/\1/p')
[ -n "$ver" ] || { log "cannot tell fio's version from '$(fio --version)'"; exit 2; }

src="$out/fio-$ver"
if [ ! -f "$src/config-host.h" ]; then
    apt_dir="$out/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
        >"$apt_dir/sources.list"
    apt=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    log "fetching fio $ver's source (Debian $suite)"
    apt-get "${apt[@]}" update -qq
    (cd "$apt_dir" && rm -f fio_*.tar.* fio_*.dsc && apt-get "${apt[@]}" source --download-only fio >/dev/null 2>&1) ||
        { log "apt-get source fio failed"; exit 1; }
    orig=$(ls "$apt_dir"/fio_"$ver"*.orig.tar.* 2>/dev/null | sed -n 1p)
    [ -n "$orig" ] || { log "the source package is not fio $ver: $(ls "$apt_dir")"; exit 1; }
    rm -rf "$src"
    mkdir -p "$src"
    tar -xf "$orig" -C "$src" --strip-components=1
    # Debian's own configure line (debian/rules), so the structures match the binary.
    (cd "$src" && ./configure --disable-native --prefix=/usr >"$out/configure.log" 2>&1) ||
        { tail -n 20 "$out/configure.log" >&2; log "fio's configure failed"; exit 1; }
fi

log "building the nvmirror-fio staticlib"
(cd "$root" && cargo build --release -q -p nvmirror-fio)
lib=${CARGO_TARGET_DIR:-$root/build}/release/libnvmirror_fio.a
cc -O2 -g -Wall -fPIC -shared -D_GNU_SOURCE -include "$src/config-host.h" -I"$src" \
    "$root/fio/engine/nvmirror.c" -o "$out/libnvmirror_fio.so.tmp" \
    -Wl,--whole-archive "$lib" -Wl,--no-whole-archive -lpthread -ldl -lm -lrt
mv "$out/libnvmirror_fio.so.tmp" "$out/libnvmirror_fio.so"
echo "$out/libnvmirror_fio.so"
