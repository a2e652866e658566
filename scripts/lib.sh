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
