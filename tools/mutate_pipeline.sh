#!/usr/bin/env bash
# Apply each named change to the HiDe/NoRGa pipeline in a scratch copy of the source and run the pipeline tests:
# every change must make them fail. Usage: bash tools/mutate_pipeline.sh (from the project root, venv in .venv).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
declare -A mutations=(
  [contrastive_sign]='s/return ce + s.contrastive_weight \* self.ctx.replicated_term(contrastive)/return ce - s.contrastive_weight * self.ctx.replicated_term(contrastive)/'
  [no_momentum_commit]='s/            self.prompts.pool.commit_blend(task, self.settings.prompt.momentum)/            pass/'
  [no_copy_init]='s/            self.prompts.pool.copy_slot(task - 1, task)/            pass/'
)
for name in "${!mutations[@]}" all_three; do
  scratch=$(mktemp -d)
  cp -r "$root/src" "$scratch/src"
  if [ "$name" = all_three ]; then
    for m in "${mutations[@]}"; do sed -i "$m" "$scratch/src/norga/methods/hide.py"; done
  else
    sed -i "${mutations[$name]}" "$scratch/src/norga/methods/hide.py"
  fi
  if cmp -s "$root/src/norga/methods/hide.py" "$scratch/src/norga/methods/hide.py"; then
    echo "$name: the change did not apply"; rm -rf "$scratch"; exit 1
  fi
  summary=$(cd "$root" && PYTHONPATH="$scratch/src" HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_hide_pipeline.py 2>&1 | grep -E "^FAILED|passed|failed" | sed 's/ - .*//')
  echo "== $name"; echo "$summary"
  rm -rf "$scratch"
done
