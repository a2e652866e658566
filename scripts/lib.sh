# Shell helpers shared by the result scripts (sourced, not run).

# keep_small WORK DEST: copy what a reviewer reads from the run folder WORK into DEST (configs,
# metrics, summaries, reports; no checkpoints, pools, models or images), then delete WORK.
keep_small() {
  local work=$1 dest=$2
  mkdir -p "$dest"
  (cd "$work" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.svg' \) \
    ! -name '*.usage.json' -print0 | tar --null -cf - -T -) | (cd "$dest" && tar -xf -)
  rm -rf "$work"
}

# distill_kept OUT NAME FLAGS...: run `$MEKD distill FLAGS` with $THREADS threads into
# OUT/.work-NAME, then keep its small files and its log in OUT/NAME (keep_small); prints the wall
# time, or where the failed run's log is.
distill_kept() {
  local out=$1 name=$2
  shift 2
  local work="$out/.work-$name" started
  started=$(date +%s)
  RAYON_NUM_THREADS=$THREADS "$MEKD" distill "$@" --out "$work" >"$work.log" 2>&1 \
    || { echo "$name failed: $work.log" >&2; return 1; }
  echo "$name: $(( $(date +%s) - started )) s"
  keep_small "$work" "$out/$name"
  mv "$work.log" "$out/$name/log.txt"
}

# finish_table OUT TEACHER: keep the teacher run's small files (TEACHER, trained by the table's
# script with its log in OUT/teacher.log) in OUT/teacher, then write and print OUT's report.
finish_table() {
  local out=$1 teacher=$2
  if [[ -d "$teacher" ]]; then
    keep_small "$teacher" "$out/teacher"
    mv "$out/teacher.log" "$out/teacher/log.txt"
  fi
  "$MEKD" report "$out" --out "$out/report" >/dev/null
  cat "$out/report/report.md"
}
