#!/usr/bin/env bash
# Functions shared by image/build.sh and image/build-template.sh (sourced, not run).
# Each logs through the caller's `log`.

# Decompresses the kernel payload of a bzImage: finds each compression magic, tries to
# decompress from there, and keeps the first result that is an ELF file.
extract_vmlinux() {
    local in=$1 out=$2 spec name magic cmd off
    local specs=(
        'xz|\xfd7zXZ\x00|xz -dc --single-stream'
        'zstd|\x28\xb5\x2f\xfd|zstd -dcq'
        'gzip|\x1f\x8b\x08|gzip -dc'
        'lz4|\x02\x21\x4c\x18|lz4 -dc'
        'bzip2|BZh[1-9]1AY&SY|bzip2 -dc'
        'lzma|\x5d\x00\x00\x00|unlzma -c'
    )
    for spec in "${specs[@]}"; do
        IFS='|' read -r name magic cmd <<<"$spec"
        command -v "${cmd%% *}" >/dev/null || continue
        for off in $(LC_ALL=C grep -obUaP "$magic" "$in" | cut -d: -f1 | head -n 16); do
            tail -c "+$((off + 1))" "$in" | $cmd >"$out.tmp" 2>/dev/null || true
            if [[ -s $out.tmp ]] && file -b "$out.tmp" | grep -q '^ELF'; then
                mv "$out.tmp" "$out"
                log "vmlinux: $name payload at offset $off"
                return 0
            fi
        done
    done
    rm -f "$out.tmp"
    return 1
}
