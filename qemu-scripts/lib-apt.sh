# shellcheck shell=bash
# Helpers shared by install-deps.sh and install-spdk.sh: read the machine's apt
# sources (never change them). Sourced, not run.

# Active apt source files (.list and deb822 .sources only; apt ignores others).
source_files() {
    local f
    [[ -f /etc/apt/sources.list ]] && echo /etc/apt/sources.list
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && echo "$f"
    done
    return 0
}

# The mirror URI serving the main bookworm suite.
debian_mirror() {
    local f uri
    while read -r f; do
        case $f in
            *.sources)
                # Print the URIs of stanzas whose Suites include "bookworm".
                uri=$(awk '
                    function flush() { if (ok > 0 && deb && uris != "") { print uris; exit } ok = 0; deb = 1; uris = "" }
                    BEGIN { deb = 1 }
                    /^[[:space:]]*$/ { flush(); next }
                    /^[[:space:]]*#/ { next }
                    tolower($1) == "enabled:" && tolower($2) == "no" { ok = -1000 }
                    tolower($1) == "uris:" { uris = $2 }
                    tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") ok += 1 }
                    tolower($1) == "types:" { deb = 0; for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
                    END { flush() }
                ' "$f" | head -n1) ;;
            *)
                uri=$(awk '
                    /^[[:space:]]*deb[[:space:]]/ {
                        i = 2
                        if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                        if ($(i + 1) == "bookworm") { print $i; exit }
                    }' "$f") ;;
        esac
        if [[ -n $uri ]]; then echo "$uri"; return 0; fi
    done < <(source_files)
    return 1
}
