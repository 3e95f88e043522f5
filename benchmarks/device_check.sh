#!/usr/bin/env bash
# The one prepared accelerator check (a lent H200: Python 3.12, jax 0.11.2; about 8 minutes in all).
#
#   OUT=/some/dir bash benchmarks/device_check.sh            # every part
#   PARTS="profile sample" bash benchmarks/device_check.sh   # a subset (a rerun)
#
# Parts, in priority order (each under its own timeout; a part is skipped once BUDGET_S is spent):
#   profile  the `mid` step (chunked attention, stored VAE moments) timed, then traced: time by op category
#            (benchmarks/trace_summary.py; the trace stays in /tmp, only its summary comes back)
#   vae      the same step with the VAE encoder inside it (the path before moments were stored)
#   attn     the step with each other attention impl in ATTN_IMPLS that this checkout accepts
#   7b       the 7B-width model with its layers cut to 4 (one chip)
#   sample   s/image at 512^2 and 1024^2, 50 steps, the paper's CFG (mid, random weights)
#   judge    logits vs generate judge on the shipped tiny-world model (speed and Spearman)
# STEP_ARGS, ARGS_7B, SAMPLE_ARGS, JUDGE_ARGS replace the sizes (tiny ones make a CPU dry run).
# Writes $OUT/device_check.txt (every part's output) and $OUT/trace_summary.txt. Missing Python packages
# (the device image lacks some of requirements.txt, e.g. ml_collections, grain) are installed from wheels in
# $WHEELS when that folder exists (carry it); the preflight names any still missing.
set -u
OUT=${OUT:-/tmp/device_check_out}
PARTS=${PARTS:-"profile vae attn 7b sample judge"}
BUDGET_S=${BUDGET_S:-450}
ATTN_IMPLS=${ATTN_IMPLS:-"dense xla splash cudnn tokamax"}
STEP_ARGS=${STEP_ARGS:-"--preset mid --image 1024x960 --tokens 8192 --text 128 --steps 5 --warmup 1"}
ARGS_7B=${ARGS_7B:-"--preset bagel_7b_mot --layers 4 --image 1024x960 --tokens 8192 --text 128 --steps 4 --warmup 1"}
SAMPLE_ARGS=${SAMPLE_ARGS:-"--preset mid --sizes 512,1024 --steps 50 --repeats 1"}
JUDGE_ARGS=${JUDGE_ARGS:-"--num 64"}
WHEELS=${WHEELS:-.device_wheels}
PY=${PY:-python3}
SCALE=${SCALE:-1}  # multiplies every part's time limit (a CPU dry run needs more)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
mkdir -p "$OUT"
LOG="$OUT/device_check.txt"
START=$(date +%s)
cd "$(dirname "$0")/.."

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
part() {  # part NAME TIMEOUT_S CMD...: run when asked for and time is left
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  if (( $(left) < 30 )); then say "== $name: skipped (budget spent)"; return 0; fi
  (( limit > $(left) )) && limit=$(left)
  say "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v "^WARNING: All log messages before absl" | tee -a "$LOG"
  say "== $name exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s total"
}

if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl 2>&1 | tail -3 | tee -a "$LOG"
fi
say "== preflight: $(date -u +%FT%TZ)"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, sys
import jax
print("python", sys.version.split()[0], "jax", jax.__version__, "devices", jax.devices())
missing = [m for m in ("flax", "optax", "ml_collections", "grain", "PIL", "safetensors", "tokenizers")
           if importlib.util.find_spec(m) is None]
print("missing python packages:", " ".join(missing) or "none")
EOF

# Attention impls this checkout accepts (a tiny forward on the default device; unknown names raise).
IMPLS=$($PY - "$ATTN_IMPLS" <<'EOF' 2>/dev/null
import sys
import jax.numpy as jnp
from srum_jax.models import attention, packing
q = jnp.zeros((1, 8, 2, 16), jnp.float32)
m = packing.to_device(packing.pack([[[packing.text(list(range(8)))]]], 8, text_capacity=8).meta)
ok = []
for name in sys.argv[1].split():
  try:
    attention.attention(q, q, q, m, m, impl=name)
    ok.append(name)
  except Exception:  # not an impl of this checkout, or not on this backend
    pass
print(" ".join(ok))
EOF
)
say "== attention impls accepted here (of: $ATTN_IMPLS): ${IMPLS:-none}"

MID="benchmarks/train_step.py $STEP_ARGS"
part profile 150 $PY $MID --attn_impl chunked --vae cached --profile_dir /tmp/device_check_trace
case " $PARTS " in *" profile "*)
  $PY benchmarks/trace_summary.py /tmp/device_check_trace --top 30 2>&1 | tee "$OUT/trace_summary.txt" | tee -a "$LOG" ;;
esac
part vae 100 $PY $MID --attn_impl chunked --vae step
for impl in $IMPLS; do
  part attn 100 $PY $MID --attn_impl "$impl" --vae cached
done
part 7b 120 $PY benchmarks/train_step.py $ARGS_7B --attn_impl chunked --vae cached
part sample 120 $PY benchmarks/sample.py $SAMPLE_ARGS --attn_impl chunked
part judge 60 $PY benchmarks/judge.py $JUDGE_ARGS --workdir /tmp/device_check_judge
say "== done after $(( $(date +%s) - START ))s"
