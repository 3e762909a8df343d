"""Safety-data mixing: SafeInstr (Bianchi, Suzgun, Attanasio, Röttger, Jurafsky, Hashimoto,
Zou, "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models that
Follow Instructions", ICLR 2024), the cheap baseline defence papers compare with (also the
mixing baselines of Eiras et al., "Do as I do (Safely)", 2024).

The defence is in the data, not in the step: ``round(safety_mix.ratio x N)`` refusal
demonstrations (harmful prompts of ``data.safety`` answered with their safe responses,
tokenized like task examples: ``data.max_length``, the chat template and system prompt,
loss on the response only) are added to the N task examples when the run's data is
prepared (``sap_ds/data/pipeline.py``: ``add_safety_demonstrations``), before packing. The
trainer then batches, packs and orders them like any task example, and the step is SFT's.

No method state: a checkpoint holds what an SFT checkpoint holds, and the demonstrations
are part of the cached, fingerprinted training table, so a resumed run sees the same
examples in the same order (tests/test_resume.py's SFT case covers the mechanics).
"""
from __future__ import annotations

from sap_ds.methods.sft import SftMethod


class SafetyMixMethod(SftMethod):
    name = "safety_mix"
    # data.safety is read for the demonstrations only: they are task examples after that, so
    # the run needs no pair table (whose data.safety_max_length limit it never trains under).
    needs_safety = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.safety_mix = cfg.safety_mix.ratio

    def bench_settings(self, trainer) -> dict:
        """The ratio, and how many demonstrations it added to this run's data."""
        return {"safety_mix_ratio": self.safety_mix, "safety_mix_examples": trainer.data.n_safety_mix}
