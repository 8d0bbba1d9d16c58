"""The quickstart's training chains: the sample plus its stellator variants, never the held-out variants it decodes."""

from __future__ import annotations

from conftest import EXAMPLES
from overlay.chains import load_chains
from overlay.generation import heldout_variants
from overlay.pipeline import training_chains
from overlay.variants import verify_chain

TRAIN = EXAMPLES / "gsm8k_train_sample.jsonl"


def test_training_variants_never_include_the_decoded_heldout_variants():
    sample = load_chains(TRAIN, "gsm8k").chains
    chains, families = training_chains(TRAIN, variants=True)
    heldout = heldout_variants(str(TRAIN), 10)
    # two per record, fewer where a record's numbers cannot vary safely (ambiguous slots are kept equal or skipped)
    assert 18 <= len(heldout) <= 20 and len(chains) > 3 * len(sample)
    trained = {c.question for c in chains}
    assert not trained & {c.question for c in heldout}
    assert {c.question for c in sample} <= trained
    assert all(verify_chain(c) is None for c in chains if c not in sample)
    assert len(families) == len(chains) and set(families) == {f"gsm8k-{c.line}" for c in sample}
    assert [c.to_text() for c in training_chains(TRAIN, variants=False)[0]] == [c.to_text() for c in sample]
