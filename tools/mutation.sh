#!/usr/bin/env bash
# Mutation run over the step's modules (docs/mutation.md), on a private copy of a commit: mutmut rewrites the
# sources it mutates, so it never runs in the working tree.
#
#   tools/mutation.sh [WORKDIR]           # default WORKDIR: a new mktemp -d
#   MUTATION_TESTS="tests/test_a.py ..."  # the test subset (default below)
#   MUTATION_CHILDREN=2                   # parallel mutants (default 2)
#   MUTATION_REV=<commit>                 # the commit to mutate (default HEAD)
#   MUTMUT=/path/to/mutmut                # else a venv with mutmut==3.8.1 is made next to WORKDIR
#
# Run it from the project's activated venv (torch, pytorch-lightning, pytest): mutmut's own venv sees its packages.
set -euo pipefail

repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
work="${1:-$(mktemp -d /tmp/lightning-clip-mutation.XXXXXX)}"
tests="${MUTATION_TESTS:-tests/test_rules.py tests/test_remedies.py tests/test_engine.py tests/test_plain_loops.py \
tests/test_nan_policies.py tests/test_lr_scale.py tests/test_spikes.py tests/test_mutation_survivors.py \
tests/test_remedy_units.py tests/test_regressions_13.py tests/test_regressions_19.py tests/test_reporter.py}"
children="${MUTATION_CHILDREN:-2}"
rev="${MUTATION_REV:-HEAD}"

mkdir -p "$work"
git -C "$repo" archive "$rev" | tar -x -C "$work"
git -C "$repo" rev-parse "$rev" > "$work/EXPORTED_FROM"
# A selected test file not committed yet (new tests under review) comes from the working tree.
selected=""
for t in $tests; do
  if [ ! -e "$work/$t" ] && [ -e "$repo/$t" ]; then cp "$repo/$t" "$work/$t"; fi
  if [ -e "$work/$t" ]; then selected="$selected $t"; fi
done

{
  echo
  echo '[tool.mutmut]'
  echo 'source_paths = ["lightning_clip"]'
  echo 'only_mutate = ['
  for m in engine reporter distributed control record slots state detect rules/norm rules/value rules/monitor remedies/skip remedies/halve_lr \
           remedies/raise_error remedies/base lr_scale counters; do
    echo "    \"lightning_clip/$m.py\","
  done
  echo ']'
  echo 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-k", "not example and not yaml and not ddp_spawn and not in_the_docs"]'
  printf 'pytest_add_cli_args_test_selection = ['
  for t in $selected; do printf '"%s", ' "$t"; done
  echo ']'
} >> "$work/pyproject.toml"

if [ -z "${MUTMUT:-}" ]; then
  venv="$work.venv"
  if [ ! -x "$venv/bin/mutmut" ]; then
    python_bin="$(python -c 'import sys; print(sys.base_prefix)')/bin/python3"
    "$python_bin" -m venv "$venv"
    # mutmut's own venv, seeing the project venv's packages (but not its editable lightning_clip: the copy is used)
    python -c 'import site; print(site.getsitepackages()[0])' > "$venv/lib/$(ls "$venv/lib")/site-packages/zz_project.pth"
    "$venv/bin/pip" install -q mutmut==3.8.1
  fi
  MUTMUT="$venv/bin/mutmut"
fi

cd "$work"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
"$MUTMUT" run --max-children "$children" > mutmut-run.log 2>&1 || true
echo "runtime: $(( $(date +%s) - start )) s" | tee runtime.txt
"$MUTMUT" results --all true > results.txt 2>&1 || true
awk -F': ' '{print $2}' results.txt | sort | uniq -c | tee summary.txt
echo "work dir: $work (mutants/, results.txt; 'mutmut show <name>' from there shows a mutant's diff)"
