#!/usr/bin/env bash
# Point the code's citations of the design files that lived outside the repository
# (ALGORITHMS.md, BAGEL.md, ENVIRONMENT.md, ARCHITECTURE.md) at their replacements in docs/:
#
#   ALGORITHMS.md §X   -> docs/algorithms.md §X      (section numbers are kept in docs/)
#   BAGEL.md §X        -> docs/bagel.md §X
#   ENVIRONMENT.md     -> docs/environment.md
#   ARCHITECTURE.md    -> docs/architecture.md
#
# A path in front of the name (`../shared/design/BAGEL.md`, `/work/shared/design/...`) is
# dropped. It also redirects the few citations of README sections whose text moved into docs/
# (listed in SED below). It edits flowpo/ tests/ benchmarks/ configs/ scripts/ only: never
# docs/, README.md, or this script.
#
#   bash scripts/redirect_citations.sh           # dry run (default): every match and its rewrite
#   bash scripts/redirect_citations.sh --apply   # rewrite in place, then check nothing is left
#
# Idempotent: after --apply a second run finds nothing. The new paths are 5 characters longer,
# so lines that end up over 100 characters are listed for rewrapping (ruff does not flag them:
# E501 is off, and the formatter leaves comments and docstrings alone).
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C.UTF-8 2>/dev/null || true # count "§" as one character

DIRS=(flowpo tests benchmarks configs scripts)
SELF=scripts/redirect_citations.sh
MAX_LINE=100

# optional path before a design file's name: ../shared/design/, /work/shared/design/, ...
PREFIX='((\.\./)+|/work/)?(shared/design/)?'
SED=(
	-e "s#${PREFIX}ALGORITHMS\\.md#docs/algorithms.md#g"
	-e "s#${PREFIX}BAGEL\\.md#docs/bagel.md#g"
	-e "s#${PREFIX}ENVIRONMENT\\.md#docs/environment.md#g"
	-e "s#${PREFIX}ARCHITECTURE\\.md#docs/architecture.md#g"
	# README sections whose text now lives in docs/
	-e 's#README, "Shapes world"#docs/results.md, "Shapes world"#g'
	-e "s#see README 'Rewards and reward services'#see docs/reward-service.md#g"
	-e 's#the README says which ran side by side#docs/results.md says which ran side by side#g'
	-e 's#\(JSON \+ base64 PNG; see README\)#(JSON + base64 PNG; see docs/reward-service.md)#g'
)
# what the rules above match (for grep -E)
GREP="ALGORITHMS\\.md|BAGEL\\.md|ENVIRONMENT\\.md|ARCHITECTURE\\.md"
GREP+='|README, "Shapes world"'
GREP+="|see README 'Rewards and reward services'"
GREP+='|the README says which ran side by side'
GREP+='|\(JSON \+ base64 PNG; see README\)'

apply=0
case "${1:-}" in
--apply) apply=1 ;;
"" | --dry-run) ;;
*)
	echo "usage: $0 [--dry-run|--apply]" >&2
	exit 2
	;;
esac

matches() { # file:line:text of every match (text files only, this script excluded)
	grep -rnIE --exclude-dir=__pycache__ "$GREP" "${DIRS[@]}" | grep -v "^${SELF}:" || true
}
files() {
	grep -rlIE --exclude-dir=__pycache__ "$GREP" "${DIRS[@]}" | grep -vx "$SELF" || true
}

n_lines=0
n_long=0
while IFS=: read -r file line text; do
	[ -n "$file" ] || continue
	new=$(printf '%s\n' "$text" | sed -E "${SED[@]}")
	n_lines=$((n_lines + 1))
	echo "$file:$line"
	echo "  - $text"
	echo "  + $new"
	if [ "${#new}" -gt "$MAX_LINE" ]; then
		echo "    (${#new} characters after the rewrite: rewrap)"
		n_long=$((n_long + 1))
	fi
done < <(matches)
n_files=$(files | grep -c . || true)
echo
echo "$n_lines lines in $n_files files; $n_long would exceed $MAX_LINE characters"

if [ "$apply" -eq 0 ]; then
	echo "dry run: nothing changed (rerun with --apply to rewrite)"
	exit 0
fi

changed=$(files)
for f in $changed; do
	sed -E -i "${SED[@]}" "$f"
done
left=$(matches)
if [ -n "$left" ]; then
	echo "citations left after the rewrite (fix by hand):" >&2
	echo "$left" >&2
	exit 1
fi
echo "rewrote $n_lines lines in $n_files files; no citation of the old files is left"
if [ "$n_long" -gt 0 ] && [ -n "$changed" ]; then
	echo "lines over $MAX_LINE characters that now cite docs/ (rewrap them):"
	# shellcheck disable=SC2086
	grep -nE 'docs/(algorithms|bagel|environment|architecture|results|reward-service)\.md' $changed |
		while IFS=: read -r file line text; do
			if [ "${#text}" -gt "$MAX_LINE" ]; then echo "  $file:$line (${#text})"; fi
		done
fi
