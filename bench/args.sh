# shellcheck shell=bash
# The bench scripts' command line (sourced first, before bench/common.sh, so that --help
# and a bad argument start nothing): `--write` (or WRITE_RESULTS=1) sets WRITE=1,
# `-h`/`--help` prints the script's `usage` and exits 0, every other argument must be a
# whole number and is appended to POSITIONAL; anything else prints usage and exits 2.
# shellcheck disable=SC2034 # WRITE and POSITIONAL are read by the sourcing script.
bench_args() {
  WRITE=${WRITE_RESULTS:-0}
  POSITIONAL=()
  for arg in "$@"; do
    case $arg in
      --write) WRITE=1 ;;
      -h | --help) usage; exit 0 ;;
      '' | *[!0-9]*) usage >&2; exit 2 ;;
      *) POSITIONAL+=("$arg") ;;
    esac
  done
}
