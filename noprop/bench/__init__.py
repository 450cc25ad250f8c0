"""`noprop bench`: end-to-end training throughput and peak memory, NoProp-DT modes against backprop.

Equal work. One NoProp-DT step = T local block updates on one minibatch of B samples; one backprop
step = one end-to-end update of the same T blocks (and head) on one minibatch. Both push every
sample through all T blocks forward and backward once, so the per-sample arithmetic is the same.
Per mode:
  parallel / chunked / lean  one train_step over all T blocks (chunked/lean: k = chunk_size / 1
                             blocks at a time, each chunk's backward before the next's forward).
  sequential                 Algorithm 1 updates ONE block per minibatch, so one step here is T
                             iterations (block t = 1..T, each on its own minibatch): T block updates
                             per B samples, like the others. It also pays T optimizer steps of the
                             shared head and T noise/CE/KL evaluations; ms_per_block_update = ms/T.
  backprop                   the paper's same-architecture baseline (docs/method.md §9), end to end;
                             "backprop (bank)": its T image branches stacked in a block bank, the
                             partner of the stacked DT rows (vmap, bank), like for like.
  cnn                        the strongest fair accuracy reference: ONE block's image branch + a
                             linear classifier. Not equal work (about 1/T of it); shown for scale.
  parallel+graph             (--cuda-graph, CUDA only) the parallel step captured once as a CUDA
                             graph and replayed (noprop.training.graphs): the same update, one launch per step.
  backprop+graph             (--cuda-graph) backprop's step captured and replayed the same way: the
                             baseline the parallel+graph rows are divided by (like for like).
samples_per_s = B / (seconds per step), i.e. training-set samples per second of epoch time: an
epoch over N samples takes N / samples_per_s seconds in every mode (Algorithm 1's epoch is T
passes that each update one block).

Memory. CUDA: torch.cuda.max_memory_allocated (reset per config), max_memory_reserved (what the
caching allocator held) and, if pynvml imports, the process's device memory from NVML (None where
NVML shows host PIDs, as in containers). CPU: every config runs in a fresh subprocess (`isolated`) so
its ru_maxrss is its own (rss_base_mb = the RSS before the model was built). Everywhere: saved_mb,
the peak bytes of tensors saved for backward that are alive at once during one step
(saved_tensors_hooks; parameters excluded, storages counted once) — deterministic and device-
independent, it shows lean < chunked < parallel.

Arithmetic. flop_per_step: the matmul and convolution operations of one eager step as torch's
FlopCounterMode counts them (~549 MFLOP per sample for T = 10 DT blocks on MNIST); TFLOP/s follows
from the median time, and on a GPU listed in report.BF16_DENSE_PEAK_TFLOPS its share of the dense
bf16 peak.

Timing: `repeats` rounds; in each round every config runs warmup steps then `steps` timed steps
(configs interleaved, so a slow spell on a shared machine hits all of them). Reported: medians over
rounds with min/max and quartiles, and ratios to backprop computed per round (side by side), then
the median.
"""
from noprop.bench.cli import add_args, main, main_args, options, run
from noprop.bench.measure import SavedTensorMeter, measure, step_factory
from noprop.bench.plan import BASELINES, DT_MODES, EXECUTIONS, Case, plan
from noprop.bench.report import add_flops, add_ratios, environment, execution_verdict, summarise, table, write_outputs

__all__ = ["BASELINES", "Case", "DT_MODES", "EXECUTIONS", "SavedTensorMeter", "add_args", "add_flops", "add_ratios",
           "environment", "execution_verdict", "main", "main_args", "measure", "options", "plan", "run",
           "step_factory", "summarise", "table", "write_outputs"]
