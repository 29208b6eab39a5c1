#!/usr/bin/env bash
# Stage helpers sourced by the recipes.
#
# run_step OUT_DIR STAMP_INPUTS [--outputs "PATH..."] -- COMMAND...
#   Runs COMMAND unless OUT_DIR is already complete and up to date.
#
#   "Up to date" means the first line of OUT_DIR/.stamp equals the hash of the command line and of
#   STAMP_INPUTS (a space-separated list of config files, upstream output dirs -- their .stamp --
#   and `tree:DIR` for a folder of source files, whose file names, sizes and mtimes count).
#   "Complete" means every file the step wrote is still there with the size it had when the step
#   finished: the stamp records them (every file under OUT_DIR except log/ and nested steps, plus
#   the files of each --outputs path, for a step that writes outside OUT_DIR). A deleted or
#   truncated output reruns the step, and, because the stamp of the rebuilt step changes, every
#   step downstream of it.
#
#   A step whose config, inputs or outputs changed is rebuilt: its finished output is moved to
#   OUT_DIR.old first, and put back if the rebuild fails (the failed attempt is kept as
#   OUT_DIR.partial and resumed by the next run with the same options). A step killed half-way
#   has no .stamp: rerunning the command lets it resume from what it already wrote. The command's
#   output goes to OUT_DIR/log/<step>.log (command first).
#
# Options are validated (parse_options.sh check_*, check_pipeline_options below) before any step
# runs, so a rejected option never touches a finished output.

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*"; }

__stamp_of() {  # prints a hash summarising the command and its inputs
  local cmd="$1"; shift
  {
    echo "$cmd"
    for x in "$@"; do
      if [[ "$x" == tree:* ]]; then
        x=${x#tree:}
        if [ -d "$x" ]; then (cd "$x" && find . -type f -printf '%P %s %T@\n' | LC_ALL=C sort); else echo "missing:$x"; fi
      elif [ -d "$x" ]; then
        if [ -f "$x/.stamp" ]; then cat "$x/.stamp"; else echo "missing-stamp:$x"; fi
      elif [ -f "$x" ]; then cat "$x"; else echo "missing:$x"; fi
    done
  } | sha1sum | cut -c1-16
}

# __list_files DIR: "size<TAB>relative path" of the files a step wrote under DIR: not its log/,
# stamps, .old / .partial copies, or folders of nested steps (those with their own .stamp).
__list_files() {
  local dir=$1
  if [ -f "$dir" ]; then find "$dir" -maxdepth 0 -printf '%s\t\n'; return 0; fi
  [ -d "$dir" ] || return 0
  {
    find "$dir" -mindepth 2 \( -name .stamp -o -name .target \) -printf 'N\t%P\n'
    find "$dir" -type f -printf 'F\t%s\t%P\n'
  } | awk -F'\t' '
    $1 == "N" { d = $2; sub(/\/[^\/]*$/, "", d); nested[d] = 1; next }
    {
      p = $3; n = split(p, part, "/")
      if (part[1] == "log" || part[n] ~ /^\.stamp/ || part[n] == ".target") next
      pre = ""
      for (i = 1; i < n; i++) {
        pre = (i == 1) ? part[1] : pre "/" part[i]
        if ((pre in nested) || part[i] ~ /\.(old|partial)$/) next
      }
      print $2 "\t" p
    }'
}

# __record_outputs OUT DECLARED...: the stamp lines recording what the step wrote.
__record_outputs() {
  local out=$1 d; shift
  __list_files "$out" | awk -F'\t' '{ print "I\t" $1 "\t" $2 }'
  for d in "$@"; do
    __list_files "$d" | D="$d" awk -F'\t' '{ print "O\t" $1 "\t" ENVIRON["D"] ($2 == "" ? "" : "/" $2) }'
  done
}

# __missing_outputs OUT: "path (why)" for each recorded output that is gone or changed size.
__missing_outputs() {
  local out=$1 want
  [ -f "$out/.stamp" ] || return 0
  want=$(OUT="$out" awk -F'\t' '$1 == "I" { print $2 "\t" ENVIRON["OUT"] "/" $3 } $1 == "O" { print $2 "\t" $3 }' \
    "$out/.stamp")
  [ -n "$want" ] || return 0
  awk -F'\t' 'FILENAME == ARGV[1] { have[$2] = $1; next }
    !($2 in have) { print $2 " (missing)"; next }
    have[$2] != $1 { print $2 " (size " have[$2] ", was " $1 ")" }' \
    <(printf '%s\n' "$want" | cut -f2 | xargs -d '\n' -r stat --printf '%s\t%n\n' -- 2>/dev/null || true) \
    <(printf '%s\n' "$want")
}

# __move_aside OUT STAMP: the finished OUT goes to OUT.old before a rebuild; a failed rebuild of
# the same stamp (OUT.partial) is resumed instead of starting over.
__move_aside() {
  local out=$1 stamp=$2
  rm -rf "$out.old"; mv "$out" "$out.old"
  if [ -d "$out.partial" ]; then
    if [ "$(cat "$out.partial/.target" 2>/dev/null)" = "$stamp" ]; then
      log "$(basename "$out"): resuming the earlier failed rebuild ($out.partial)"
      mv "$out.partial" "$out"
    else
      rm -rf "$out.partial"
    fi
  fi
}

run_step() {
  local out="$1" inputs="$2"; shift 2
  local declared=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
      --outputs) read -r -a declared <<< "$2"; shift 2 ;;
      *) echo "run_step: unknown option $1" >&2; return 2 ;;
    esac
  done
  [ "${1:-}" = "--" ] && shift
  local cmd="$*" name stamp missing rebuilt=""
  name=$(basename "$out")
  # shellcheck disable=SC2086
  stamp=$(__stamp_of "$cmd" $inputs)
  if [ -f "$out/.stamp" ]; then
    if [ "$(head -n 1 "$out/.stamp")" = "$stamp" ]; then
      missing=$(__missing_outputs "$out")
      if [ -z "$missing" ]; then
        log "skip $name: done and up to date ($out)"
        return 0
      fi
      log "$name: $(echo "$missing" | wc -l) output(s) missing or changed since it finished" \
          "($(echo "$missing" | head -n 3 | paste -sd, -)); rebuilding $out (old copy in $out.old)"
    else
      log "$name: config or inputs changed; rebuilding $out (old copy in $out.old)"
    fi
    __move_aside "$out" "$stamp"
    rebuilt=1
  fi
  mkdir -p "$out/log"
  echo "$stamp" > "$out/.target"
  local logf="$out/log/$name.log"
  log "run $name -> $out (log: $logf)"
  { echo "# $cmd"; echo "# started $(date)"; } >> "$logf"
  local t0=$SECONDS
  if ! "$@" 2>&1 | tee -a "$logf"; then
    if [ -n "$rebuilt" ] && [ -d "$out.old" ]; then
      rm -rf "$out.partial"; mv "$out" "$out.partial"; mv "$out.old" "$out"
      log "FAILED: $name (see $out.partial/log/$name.log); the previous output is back in $out." \
          "Fix the problem and rerun the same command: the rebuild resumes from $out.partial"
    else
      log "FAILED: $name (see $logf); rerun the same command to resume"
    fi
    return 1
  fi
  local d
  for d in "${declared[@]}"; do
    if [ ! -e "$d" ]; then
      log "FAILED: $name finished but did not write $d (see $logf)"
      return 1
    fi
  done
  echo "# finished $(date) after $((SECONDS - t0)) s" >> "$logf"
  rm -f "$out/.target"
  { echo "$stamp"; echo "# built $(date '+%Y-%m-%d %H:%M:%S.%N')"; __record_outputs "$out" "${declared[@]}"; } \
    > "$out/.stamp.tmp" && mv "$out/.stamp.tmp" "$out/.stamp"
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
