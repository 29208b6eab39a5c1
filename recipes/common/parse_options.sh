#!/usr/bin/env bash
# Kaldi-style option parsing, sourced by run.sh after its defaults are set.
# `--some-option value` sets the shell variable some_option; an option exists only if the script
# gave it a default first, so a typo fails instead of being ignored. `--config FILE` reads a file
# of `name=value` lines first; options given on the command line override it.
# Positional arguments that remain are left in "$@".
#
# Nothing the user typed is ever evaluated as shell code: an option name must match
# ^[a-z][a-z0-9_-]*$ and name a variable that already exists, and values are assigned with
# printf -v. (A name like `x;rm -rf ~` or `a$(cmd)` is rejected before anything runs.)
#
# The check_* functions below validate values up front (integers in range, positive numbers), so a
# bad option stops the recipe before any step moves or rebuilds a finished output.

__usage_and_exit() { echo "$0: $1" >&2; [ -n "${help_message:-}" ] && echo "$help_message" >&2; exit 1; }

# __check_name RAW WHERE: RAW is an option name as typed (dashes allowed); sets __name to its
# variable, or stops when the name is malformed or names no existing variable.
__check_name() {
  [[ "$1" =~ ^[a-z][a-z0-9_-]*$ ]] || __usage_and_exit "$2: invalid option name '$1' (lower-case letters, digits, - and _ only)"
  __name=${1//-/_}
  declare -p "$__name" >/dev/null 2>&1 || __usage_and_exit "$2: unknown option --$1"
}

# __set_option RAW VALUE WHERE: assigns VALUE to the option's variable (never evaluated).
__set_option() {
  local old
  __check_name "$1" "$3"
  old=${!__name}
  if [ "$old" = true ] || [ "$old" = false ]; then
    case "$2" in true|false) ;; *) __usage_and_exit "$3: option --$1 takes true or false, got '$2'";; esac
  fi
  printf -v "$__name" '%s' "$2"
}

# A --config file applies first: `name=value` lines (value optionally in matching quotes), `#` comments.
__read_config() {
  local cfg="$1" line n=0 key value
  [ -f "$cfg" ] || __usage_and_exit "config file '$cfg' not found"
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%$'\r'}
    [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]] && continue
    [[ "$line" =~ ^[[:space:]]*([^=]+)=(.*)$ ]] || __usage_and_exit "$cfg:$n: expected name=value, got '$line'"
    key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    if [[ "$value" =~ ^\"(.*)\"$ ]] || [[ "$value" =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
    __set_option "$key" "$value" "$cfg:$n"
  done < "$cfg"
}

__args=("$@")
for ((__i = 0; __i < ${#__args[@]}; __i++)); do
  if [ "${__args[$__i]}" = "--config" ]; then
    __read_config "${__args[$((__i + 1))]:-}"
  fi
done

while true; do
  [ $# -eq 0 ] && break
  case "$1" in
    --help|-h) echo "${help_message:-no help}"; exit 0 ;;
    --config) shift 2 ;;
    --*=*) __usage_and_exit "use '--name value', not '--name=value' ($1)" ;;
    --*)
      __check_name "${1#--}" "command line"
      [ $# -ge 2 ] || __usage_and_exit "option $1 needs a value"
      __set_option "${1#--}" "$2" "command line"
      shift 2 ;;
    *) break ;;
  esac
done
unset __args __i __name

# ---- value checks, called by run.sh after parsing (each names the option and the rule)

# check_int NAME MIN [MAX]: an integer (digits only) >= MIN (and <= MAX).
check_int() {
  local name=$1 min=$2 max=${3:-} v
  v=${!name}
  local opt="--${name//_/-}"
  [[ "$v" =~ ^[0-9]+$ ]] || __usage_and_exit "$opt must be a whole number, got '$v'"
  v=$((10#$v))
  [ "$v" -ge "$min" ] || __usage_and_exit "$opt must be >= $min, got $v"
  [ -z "$max" ] || [ "$v" -le "$max" ] || __usage_and_exit "$opt must be <= $max, got $v"
}

# check_int_list NAME MIN [MAX]: comma-separated integers, each >= MIN (and <= MAX).
check_int_list() {
  local name=$1 min=$2 max=${3:-} x
  local opt="--${name//_/-}" v=${!name}
  [ -n "$v" ] || __usage_and_exit "$opt must not be empty"
  [[ "$v" =~ ^[0-9]+(,[0-9]+)*$ ]] || __usage_and_exit "$opt must be comma-separated whole numbers, got '$v'"
  for x in ${v//,/ }; do
    x=$((10#$x))
    [ "$x" -ge "$min" ] || __usage_and_exit "$opt: every value must be >= $min, got $x"
    [ -z "$max" ] || [ "$x" -le "$max" ] || __usage_and_exit "$opt: every value must be <= $max, got $x"
  done
}

# check_positive_list NAME: comma-separated decimal numbers (like 0.5 or 10), each > 0.
check_positive_list() {
  local name=$1 x num='[0-9]+(\.[0-9]+)?'
  local opt="--${name//_/-}" v=${!name}
  [[ "$v" =~ ^$num(,$num)*$ ]] || __usage_and_exit "$opt must be comma-separated numbers like 0.5,2, got '$v'"
  for x in ${v//,/ }; do
    [[ "$x" =~ [1-9] ]] || __usage_and_exit "$opt: every value must be > 0, got $x"
  done
}

# check_stages MAX: --stage and --stop-stage are integers in 0..MAX and --stop-stage >= --stage.
check_stages() {
  check_int stage 0 "$1"
  check_int stop_stage 0 "$1"
  [ "$stop_stage" -ge "$stage" ] || __usage_and_exit "--stop-stage ($stop_stage) must be >= --stage ($stage)"
}

# check_one_of NAME WORD...: the value is one of the words.
check_one_of() {
  local name=$1 w; shift
  for w in "$@"; do [ "${!name}" = "$w" ] && return 0; done
  __usage_and_exit "--${name//_/-} must be one of: $*; got '${!name}'"
}
