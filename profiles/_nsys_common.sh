# Sourced by nsys_train.sh and nsys_generate.sh: the set-up and the profile -> report ->
# summary steps they share. Expects NAME (the summary's name) and WORKLOAD (train|generate).

nsys_prepare() {
  PYTHON="${PYTHON:-}"
  if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
  fi
  NSYS_BIN="${NSYS:-$(command -v nsys || true)}"
  if [ -z "$NSYS_BIN" ] || [ ! -x "$NSYS_BIN" ]; then
    echo "error: nsys not found: put it on the PATH or set NSYS=/path/to/nsys" >&2
    echo "       (no Nsight Systems? python profiles/torch_profile.py $WORKLOAD --device cuda" >&2
    echo "        gives a torch.profiler table and a Chrome trace instead)" >&2
    exit 2
  fi
  if ! "$PYTHON" -c 'import nvtx' 2>/dev/null; then
    echo "warning: the Python nvtx package is not installed for $PYTHON: the summary will have no" >&2
    echo "         sashimi/* NVTX ranges, only kernels (pip install nvtx)" >&2
  fi
  REPORT_DIR="${REPORT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sashimi_nsys.XXXXXX")}"
  SUMMARY_DIR="${SUMMARY_DIR:-profiles}"
  mkdir -p "$REPORT_DIR" "$SUMMARY_DIR"
  REPORT="$REPORT_DIR/$NAME"
  rm -f "$REPORT.nsys-rep" "$REPORT.qdstrm"
}

# nsys_profile_and_summarise TITLE NOTE COMMAND... : profile COMMAND, convert a leftover
# .qdstrm when NSYS_QDSTRM_IMPORTER is set, write $SUMMARY_DIR/${NAME}_summary.txt.
nsys_profile_and_summarise() {
  local title=$1 note=$2
  shift 2
  echo "== nsys profile: $*"
  # nsys may exit non-zero after a complete capture ("ShutdownRequest"): judge by the files
  set +e
  "$NSYS_BIN" profile -t cuda,nvtx -s none --cpuctxsw=none -o "$REPORT" --force-overwrite true "$@"
  local rc=$?
  set -e
  if [ ! -f "$REPORT.nsys-rep" ] && [ -f "$REPORT.qdstrm" ] && [ -n "${NSYS_QDSTRM_IMPORTER:-}" ]; then
    echo "== QdstrmImporter: $REPORT.qdstrm -> $REPORT.nsys-rep"
    "$NSYS_QDSTRM_IMPORTER" -i "$REPORT.qdstrm"
  fi
  if [ ! -f "$REPORT.nsys-rep" ]; then
    echo "error: nsys wrote no $REPORT.nsys-rep (profile exit status $rc)" >&2
    [ -f "$REPORT.qdstrm" ] && echo "       a $REPORT.qdstrm exists: set NSYS_QDSTRM_IMPORTER to convert it" >&2
    exit 1
  fi
  SUMMARY="$SUMMARY_DIR/${NAME}_summary.txt"
  {
    echo "# nsys summary: $title"
    echo "# date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "# device: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)' 2>/dev/null || echo unknown)"
    echo "# ($note)"
    echo
    "$NSYS_BIN" stats -r nvtx_sum,cuda_gpu_kern_sum --force-export=true "$REPORT.nsys-rep"
  } > "$SUMMARY"
  echo "== wrote $SUMMARY (report: $REPORT.nsys-rep)"
}
