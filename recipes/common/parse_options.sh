#!/usr/bin/env bash
# Kaldi-style option parsing, sourced by run.sh after its defaults are set.
# `--some-option value` sets the shell variable some_option; an option exists only if the script
# gave it a default first, so a typo fails instead of being ignored. `--config FILE` sources a file
# of `name=value` lines first; options given on the command line override it.
# Positional arguments that remain are left in "$@".

__usage_and_exit() { echo "$0: $1" >&2; [ -n "${help_message:-}" ] && echo "$help_message" >&2; exit 1; }

# A --config file applies first.
__args=("$@")
for ((__i = 0; __i < ${#__args[@]}; __i++)); do
  if [ "${__args[$__i]}" = "--config" ]; then
    __cfg="${__args[$((__i + 1))]:-}"
    [ -f "$__cfg" ] || __usage_and_exit "config file '$__cfg' not found"
    # shellcheck disable=SC1090
    . "$__cfg"
  fi
done

while true; do
  [ $# -eq 0 ] && break
  case "$1" in
    --help|-h) echo "${help_message:-no help}"; exit 0 ;;
    --config) shift 2 ;;
    --*=*) __usage_and_exit "use '--name value', not '--name=value' ($1)" ;;
    --*)
      __name=$(echo "$1" | sed -e 's/^--//' -e 's/-/_/g')
      eval '[ -z "${'"$__name"'+x}" ]' && __usage_and_exit "unknown option $1"
      [ $# -ge 2 ] || __usage_and_exit "option $1 needs a value"
      __old=$(eval echo "\$$__name")
      if [ "$__old" = true ] || [ "$__old" = false ]; then
        case "$2" in true|false) ;; *) __usage_and_exit "option $1 takes true or false, got '$2'";; esac
      fi
      eval "$__name=\"\$2\""
      shift 2 ;;
    *) break ;;
  esac
done
unset __args __i __cfg __name __old
