"""Benchmarks of lowrank against torch.optim and torch.linalg, with accuracy beside every time.

    python -m bench [--quick] [--device cuda] [--threads N] [--out-dir DIR]   (bench/cli.py: run(argv))
    python -m bench.report [CSV ...]       README table (TABLE.md) and plot from the rows
    python -m bench.breakdown [--shape N]  where the time of one SpectralSGD step goes

For bench/gpu_check.py (GPU machine, source checkout), one call runs a whole suite on CUDA and
appends its rows to bench/results/<device>-<date>.csv::

    from bench.suites import run_suite
    rows, csv_path = run_suite("cuda", suite="full")     # or suite="quick"; out_dir=..., providers=
                                                         # ["spectral*"], workloads=["matrix"] to subset
    from bench import report, results
    report.write_report(results.read_rows([csv_path]).query(f"run_id == '{rows[0]['run_id']}'"),
                        out_dir, table_name="TABLE-cuda.md")

or equivalently ``bench.cli.run(["--device", "cuda", "--out-dir", OUT])``. One group (one
workload, dtype, momentum and set of k, every provider interleaved) is
``bench.harness.measure_group(Group(...), "cuda", providers, budget=Budget(...))``. On CUDA the
providers are timed with torch.cuda.Event pairs (L2 flushed, GPU idle before each call), report
torch.cuda.max_memory_allocated per step and GB/s against the device's peak bandwidth.
"""
