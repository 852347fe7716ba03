#!/usr/bin/env bash
# assemble docs/results.md from the generated answer/tables and the hand-written parts
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/python experiments/study/converge_doc.py docs/results_converge.json --img docs/img > /tmp/converge_generated.md 2>/dev/null
{
echo "# Results: every arm at its own best, method 2 at 60 fresh copies (issue 18)"
echo
echo "<!-- the first paragraph and the tables are generated: experiments/study/converge_doc.py docs/results_converge.json; plan: docs/study_plan.md (committed before any result) -->"
echo
sed -n 1p /tmp/converge_generated.md
echo
cat experiments/study/converge_page/layers.md
echo
cat experiments/study/converge_page/corrections.md
echo
cat experiments/study/converge_page/practitioner.md
echo
cat experiments/study/converge_page/reading.md
echo
echo "![learning curves and accuracy against compute](img/converge_curves.png)"
echo
sed -n '3,$p' /tmp/converge_generated.md
echo
cat experiments/study/converge_page/converged.md
echo
cat experiments/study/converge_page/protocol.md
echo
cat experiments/study/converge_page/deviations.md
echo
cat experiments/study/converge_page/reproduce.md
} > docs/results.md
echo assembled
