# Sourced by up.sh and down.sh.
# shellcheck shell=bash

# A running process by its start (boot and start time), so that a PID reused since is not taken
# for it; fails for none, and for a dead process not reaped yet.
proc_start() {  # $1: pid
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $stat
  case "$1" in Z | X | x) return 1 ;; esac
  echo "$(cat /proc/sys/kernel/random/boot_id) ${20}"
}
