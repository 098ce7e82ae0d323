#!/usr/bin/env bash
# A larger real-photo corpus for offline training and evaluation: 345 colour photographs (nature, animals,
# fish, monuments, cities, everyday objects; 256 px to 6000 px) that ship inside Debian packages.
# Installs the packages (about 1.2 GB on disk, a few minutes), then copies the photos to DEST/<package>/.
# Licences: each package's /usr/share/doc/<package>/copyright (CC-BY/CC-BY-SA/CC0/GPL/BSD/public domain).
# usage: scripts/corpus/build.sh DEST        (as root; DEST defaults to ./photos)
# Ends by checking every exported photo against SHA256SUMS (the corpus the README's study used).
set -euo pipefail
DEST=${1:-photos}
here=$(cd "$(dirname "$0")" && pwd)
pkgs=$(tail -n +2 "$here/photos.tsv" | cut -f1 | sort -u | tr '\n' ' ')
missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  apt-get update -qq
  # --no-install-recommends: otherwise a theme package pulls in a display manager
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
python3 "$here/export.py" "$DEST"
(cd "$DEST" && sha256sum -c --quiet "$here/SHA256SUMS") && echo "corpus verified: $(wc -l < "$here/SHA256SUMS") photos match SHA256SUMS"
