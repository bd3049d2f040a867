# Sourced by the runs/ scripts: `step NAME COMMAND...` runs a command and remembers how long it
# took; `report` prints where the time went.
STEPS=() SECONDS_TAKEN=()
step() {
  local name=$1 start=$EPOCHREALTIME
  shift
  echo "== $name: $*"
  "$@"
  STEPS+=("$name")
  SECONDS_TAKEN+=("$(python -c "print(f'{$EPOCHREALTIME - $start:.1f}')")")
}
report() {
  local total=0
  echo
  echo "where the time went:"
  for i in "${!STEPS[@]}"; do
    printf "  %-18s %9s s\n" "${STEPS[$i]}" "${SECONDS_TAKEN[$i]}"
    total=$(python -c "print(f'{$total + ${SECONDS_TAKEN[$i]}:.1f}')")
  done
  printf "  %-18s %9s s\n" "total" "$total"
}
