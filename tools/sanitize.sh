#!/usr/bin/env bash
# Builds the engine with AddressSanitizer and UndefinedBehaviorSanitizer in a venv of its
# own and runs the test suite against it (slow tests excluded unless SANITIZE_ALL=1).
#   tools/sanitize.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SANITIZE_VENV:-build/sanitize-venv}
python -m venv "$venv"
"$venv/bin/pip" install -q ".[test]" \
  -Ccmake.define.TENSORFILE_SANITIZE="address,undefined" -Ccmake.build-type=RelWithDebInfo \
  -Cbuild-dir=build/sanitize
# Python itself is not instrumented, so the runtimes are preloaded; CPython's arenas look
# like leaks to LeakSanitizer, so leak checking is off. Any ASan/UBSan report aborts.
asan=$(g++ -print-file-name=libasan.so)
ubsan=$(g++ -print-file-name=libubsan.so)
marker=(-m "not slow")
[ "${SANITIZE_ALL:-0}" = 1 ] && marker=()
cd tests/..
LD_PRELOAD="$asan $ubsan" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${marker[@]}" "$@"
