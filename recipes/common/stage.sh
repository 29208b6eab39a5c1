#!/usr/bin/env bash
# Stage helpers sourced by the recipes.
#
# run_step OUT_DIR STAMP_INPUTS [--outputs "PATH..."] -- COMMAND...
#   Runs COMMAND unless OUT_DIR is already complete and up to date. The decision and the stamp
#   are asr/step.py's (`asr step`, its docstring has the details); what the user sees:
#
#   - a rerun skips a step whose command line and STAMP_INPUTS (a space-separated list of config
#     files, upstream output dirs -- their .stamp -- and `tree:DIR` for a folder of source files,
#     whose file names, sizes and mtimes count) are unchanged and whose outputs are all still there
#     with the sizes they had (every file under OUT_DIR except log/ and nested steps, plus the files
#     of each --outputs path, for a step that writes outside OUT_DIR);
#   - a changed config or upstream output, or a deleted or truncated output, rebuilds the step, and,
#     because its stamp changes, every step downstream of it;
#   - a rebuild moves the finished output to OUT_DIR.old first and puts it back if the rebuild fails
#     (the failed attempt is kept as OUT_DIR.partial and resumed by the next run with the same
#     options);
#   - a step killed half-way has no .stamp: rerunning the command lets it resume from what it
#     already wrote. The command's output goes to OUT_DIR/log/<step>.log (command first).
#
# Options are validated (parse_options.sh check_*, check_pipeline_options below) before any step
# runs, so a rejected option never touches a finished output.

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*"; }

# The checkout's own `asr` (recipes may be run before path.sh puts it on PATH, e.g. in tests).
__asr_step=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv/bin/asr
[ -x "$__asr_step" ] || __asr_step=asr

run_step() {
  local out="$1" inputs="$2"; shift 2
  local outputs=""
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
      --outputs) outputs="$2"; shift 2 ;;
      *) echo "run_step: unknown option $1" >&2; return 2 ;;
    esac
  done
  [ "${1:-}" = "--" ] && shift
  "$__asr_step" step --out "$out" --inputs "$inputs" --outputs "$outputs" -- "$@"
}

# check_pipeline_options MAX_STAGE: the options every recipe shares, checked before any step runs
# (needs parse_options.sh for the check_* functions).
check_pipeline_options() {
  check_stages "$1"
  check_int nj 1
  check_int members 1
  check_int ngpu 1
  check_int_list ensemble_sizes 1 "$members"
  check_int_list decode_ensemble_sizes 1      # sizes not in --ensemble-sizes are not decoded
  check_positive_list gmm_acwt_grid
  check_positive_list nn_acwt_grid
  check_students
  check_one_of labels mono tri
}

# check_students: every student variant is distill or distill_<name> with a conf/<variant>.yaml.
check_students() {
  local v
  [ -n "$students" ] || __usage_and_exit "--students: give at least one student variant"
  for v in $students; do
    [[ "$v" =~ ^distill(_[a-z0-9]+)*$ ]] || __usage_and_exit "--students: '$v' must be distill or distill_<name>"
    [ -f "$conf/$v.yaml" ] || __usage_and_exit "--students: no $conf/$v.yaml for variant $v"
  done
}

# student_system_name DIR: the decode name of a variant's chosen student, as asr.systems names it
# (distill/T1 -> distilled-T1, distill_paper/T2 -> distilled-paper-T2); needs DIR/choice.json.
student_system_name() {
  local v best
  v=$(basename "$1")
  best=$(sed -n 's/.*"best_dir": "\(T[0-9.]*\)".*/\1/p' "$1/choice.json" 2>/dev/null)
  [ -n "$best" ] || { echo "student_system_name: no best_dir in $1/choice.json" >&2; return 1; }
  if [ "$v" = distill ]; then echo "distilled-$best"; else echo "distilled-${v#distill_}-$best"; fi
}
