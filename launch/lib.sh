# Shell functions shared by the launch scripts (sourced, not run).
# shellcheck shell=bash

# Quotes one word for display so the printed line can be pasted back into a shell.
quote_word() {
  local w=$1
  if [[ -n $w && $w != *[!A-Za-z0-9_./=:@%+,-]* ]]; then
    printf '%s' "$w"
  else
    printf "'%s'" "${w//\'/\'\\\'\'}"
  fi
}
