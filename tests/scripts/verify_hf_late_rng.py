"""examples/hf_trainer.py with the Trainer's own RNG restore: what a resume gets when the
script calls ``trainer.train(resume_from_checkpoint=...)`` itself instead of ``run.train(trainer)``.

The Trainer puts the RNGs back only after it has fetched the first resumed batch, so that
batch's augmentation (``random.randint``, ``np.random`` in ``Sequences.__getitem__``) draws
from the freshly seeded RNGs instead of where the uninterrupted run was. sweeprun's callback
closes that gap by hooking the dataset's fetches (``RngReplay.hook`` in
``sweeprun.integrations.hf_rng``); here the hook is
left out and nothing else changes (sealed folders, metrics, exit 75), so ``sweeprun verify``
must name the RNG. Run exactly as the example: ``python tests/scripts/verify_hf_late_rng.py
--max-steps 40 ...``.
"""

import runpy
import sys
from pathlib import Path

from sweeprun.integrations.hf_rng import RngReplay

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"

RngReplay.hook = lambda self, trainer: None  # type: ignore[method-assign]
sys.argv[0] = str(EXAMPLE)
runpy.run_path(str(EXAMPLE), run_name="__main__")
