#!/usr/bin/env bash
# Stage helpers sourced by the recipes.
#
# run_step OUT_DIR STAMP_INPUTS -- COMMAND...
#   Runs COMMAND unless OUT_DIR is already complete and up to date. "Up to date" means OUT_DIR/.stamp
#   equals the hash of the command line, the files/dirs' stamps listed in STAMP_INPUTS (a
#   space-separated list of config files and upstream output dirs). A stage whose config or inputs
#   changed is moved aside and rebuilt, so everything downstream (whose stamps include this one's)
#   reruns too. A stage killed half-way has no .stamp: rerunning the command lets the step resume
#   from what it already wrote. The command's output goes to OUT_DIR/log/<step>.log (command first).

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') ($(basename "$0"):${BASH_LINENO[0]}) $*"; }

__stamp_of() {  # prints a hash summarising the command and its inputs
  local cmd="$1"; shift
  {
    echo "$cmd"
    for x in "$@"; do
      if [ -d "$x" ]; then
        if [ -f "$x/.stamp" ]; then cat "$x/.stamp"; else echo "missing-stamp:$x"; fi
      elif [ -f "$x" ]; then cat "$x"; else echo "missing:$x"; fi
    done
  } | sha1sum | cut -c1-16
}

run_step() {
  local out="$1" inputs="$2"; shift 2
  [ "$1" = "--" ] && shift
  local cmd="$*" name stamp
  name=$(basename "$out")
  # shellcheck disable=SC2086
  stamp=$(__stamp_of "$cmd" $inputs)
  if [ -f "$out/.stamp" ]; then
    if [ "$(cat "$out/.stamp")" = "$stamp" ]; then
      log "skip $name: done and up to date ($out)"
      return 0
    fi
    log "$name: config or inputs changed; rebuilding $out (old copy in $out.old)"
    rm -rf "$out.old"; mv "$out" "$out.old"
  fi
  mkdir -p "$out/log"
  local logf="$out/log/$name.log"
  log "run $name -> $out (log: $logf)"
  { echo "# $cmd"; echo "# started $(date)"; } >> "$logf"
  local t0=$SECONDS
  if ! "$@" 2>&1 | tee -a "$logf"; then
    log "FAILED: $name (see $logf); rerun the same command to resume"
    return 1
  fi
  echo "# finished $(date) after $((SECONDS - t0)) s" >> "$logf"
  echo "$stamp" > "$out/.stamp.tmp" && mv "$out/.stamp.tmp" "$out/.stamp"
}
