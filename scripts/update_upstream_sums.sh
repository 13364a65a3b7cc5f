#!/usr/bin/env bash
# Regenerate the manifests of patches/upstream (run it after adding or changing a pinned copy or a
# patch):
#   - PATCHED.SHA256SUMS: the sha256 of each release's touched files with the release's patch
#     applied to its pinned copy (`megatron-agg patch` recognises an already patched checkout by it);
#   - SHA256SUMS: every file under patches/upstream (the pinned upstream copies, the folder's README
#     and PATCHED.SHA256SUMS).
# Only the two manifests ship in the wheel (the copies stay in the repository, for the tests);
# tests/test_patches.py checks SHA256SUMS, tests/test_patch_cli.py PATCHED.SHA256SUMS.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# megatron_agg/patching.py needs only the standard library: load it alone (no torch).
"$PY" - "$ROOT" <<'PYEOF'
import importlib.util, sys
from pathlib import Path
root = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("patching", root / "megatron_agg" / "patching.py")
patching = importlib.util.module_from_spec(spec)
sys.modules["patching"] = patching
spec.loader.exec_module(patching)
lines = []
for target in patching.TARGETS.values():
    for release in target.releases:
        digests = patching.patched_digests_of_copies(target, release)
        for name, digest in sorted((digests or {}).items()):
            lines.append(f"{digest}  ./{target.pinned[release]}/{name}")
out = root / "patches" / "upstream" / patching.PATCHED_MANIFEST
out.write_text("".join(line + "\n" for line in sorted(lines, key=lambda l: l.split(maxsplit=1)[1])))
print(f"patches/upstream/{out.name}: {len(lines)} files")
PYEOF
cd "$ROOT/patches/upstream"
find . -type f ! -name SHA256SUMS ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum > SHA256SUMS
echo "patches/upstream/SHA256SUMS: $(wc -l < SHA256SUMS) files"
