"""The GPU check (``scripts/gpu_check.sh``): proves the GPU path and writes a report,
``gpu_check.json`` and ``gpu_check.md``, under ``--out``; on a GPU as two parts of ~5 minutes
each (``--part 1``: correctness, ``--part 2``: speed; ``__main__.PARTS``), each with its own
report, or all steps in one run.

Steps (issue 17, "The GPU check"), each recorded as pass / fail / skipped with its checks and
figures; a failing step never stops the ones after it:

1. versions and capabilities            (``kernels_check.versions_step``)
2. compiled Triton kernels vs twins      (``kernels_check.kernels_step``)
3. kernel bandwidth (``sap_ds_kernels.bench``) (``kernels_check.bandwidth_step``)
4. the engine path in bf16 with Triton   (``engine_check``, one launch for 4-7)
5. the bf16 perturbation table and the probe gradient's noise floor
6. ``sap-ds bench``: SFT vs SAP's forms (paper, fast, recommended and its cheaper forms), Lisa, mixing
7. preempted at step 2 (checkpoint), resumed to step 3, export loads in plain transformers

``--cpu`` runs the same code with CPU sizes, the Triton interpreter and gloo (2 ranks), so
the test suite keeps every step alive; GPU-only targets are reported as not applicable.
"""
