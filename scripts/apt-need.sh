#!/usr/bin/env bash
# Install missing Debian packages: `scripts/apt-need.sh curl redis-server:redis-server` installs each PACKAGE
# whose COMMAND (the part before ':', or the package name itself) is not on PATH. `-` as COMMAND: always.
set -euo pipefail
missing=()
for want in "$@"; do
  cmd="${want%%:*}" pkg="${want#*:}"
  [[ "$cmd" != "-" ]] && command -v "$cmd" >/dev/null && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" && [[ "$cmd" == "-" ]] && continue
  missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "sibyl: needs the system packages: ${missing[*]} (on Debian: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "sibyl: installing ${missing[*]} with apt"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
