import pytest
import torch

from omnissl.eval.metrics import accuracy, cer, edit_distance, wer


@pytest.mark.parametrize(("ref", "hyp", "dist"), [
    ("", "", 0),
    ("abc", "", 3),            # three deletions
    ("", "ab", 2),             # two insertions
    ("kitten", "sitting", 3),  # k->s, e->i, +g
    ("flaw", "lawn", 2),       # -f, +n
    ("intention", "execution", 5),
    ("abc", "abc", 0),
])
def test_edit_distance_hand_computed(ref, hyp, dist):
    assert edit_distance(ref, hyp) == dist
    assert edit_distance(hyp, ref) == dist  # symmetric
    assert edit_distance(list(ref), list(hyp)) == dist  # any sequence, not only str


def test_cer_and_wer_are_corpus_level():
    refs = ["the cat sat", "on the mat"]
    hyps = ["the bat sat", "on mat"]
    # chars: "the cat sat" vs "the bat sat" = 1 substitution; "on the mat" vs "on mat" = 4 deletions
    # ("the " removed); reference characters 11 + 10 = 21
    assert cer(refs, hyps) == pytest.approx(5 / 21)
    # words: 1 substitution (cat->bat) + 1 deletion (the); reference words 3 + 3 = 6
    assert wer(refs, hyps) == pytest.approx(2 / 6)
    assert cer(["ab"], ["abxyz"]) == pytest.approx(1.5)  # insertions can push a rate past 1
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        cer(refs, hyps[:1])
    with pytest.raises(ValueError, match="all empty"):
        wer([""], ["x"])


def test_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
