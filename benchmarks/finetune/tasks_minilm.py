"""Task 3 — the real pretrained all-MiniLM-L6-v2 fine-tuned on an offline text classification task.

The task: negation-aware sentiment over four topic domains (sport, food, technology, travel),
built from word lists and templates, e.g. "Honestly, the pasta was not delightful." → negative.
Label = polarity of the adjective, flipped by a negated template.

Why not plain topic classification: with held-out words and templates, a logistic regression on
the *frozen* mean-pooled MiniLM embeddings already classifies 4 topics at 98 % (and plain
sentiment at 99 %), so there is nothing for fine-tuning to show. Negation is what mean-pooled
sentence embeddings are known to blur; frozen embeddings reach only 65-75 % here, leaving room.

Splits (fixed, independent of the seed):

* train: 7 of 12 subjects per domain, 6 of 10 adjectives per polarity, 7 of 10 affirmative and
  5 of 8 negated templates (every combination is a candidate; batches are drawn from it);
* val and test: held-out templates and held-out adjectives, with disjoint held-out subjects
  (val 2, test 3 per domain); :data:`N_VAL` and :data:`N_TEST` sentences sampled once.

Model: ``BertModel`` (``frogwatch.sources.load_default_model()``), mean pooling over the attention
mask (as sentence-transformers does for this model), and a new linear head 384 → 2 that every method
trains (lr ``Problem.head_lr``; not counted in ``trainable``). Dropout as configured (0.1).
Targets: the 36 ``nn.Linear`` matrices of the 6 encoder layers (T = 10,616,832); the unused pooler,
the embeddings and LayerNorms are outside the budget (``full`` trains them all).

Metrics: ``target_metric`` = test accuracy; ``val_metric`` = val accuracy (ties: ``val_loss``);
``source_metric`` = Spearman correlation between the pairwise cosine similarities of
:data:`SIMILARITY_SENTENCES` (48 general-domain sentences unrelated to the task, 1,128 pairs)
under the pretrained encoder and under the fine-tuned one — how much of the original sentence
geometry is kept (1 = identical ranking).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from train import Problem

__all__ = ["SIMILARITY_SENTENCES", "make_problem"]

N_VAL, N_TEST = 256, 512
BATCH = 16

SUBJECTS = {
    "sport": ["the match", "the tournament", "the team's season", "the final game", "the race",
              "the training session", "the derby", "the league", "the coach's tactics",
              "the marathon", "the penalty shootout", "the championship"],
    "food": ["the soup", "the pasta", "the dessert", "the new bakery", "the dinner menu", "the curry",
             "the sushi", "the breakfast", "the pizza", "the salad", "the cheese plate", "the roast"],
    "tech": ["the new laptop", "the software update", "the phone's battery", "the app",
             "the operating system", "the router", "the smartwatch", "the graphics card",
             "the keyboard", "the cloud service", "the printer", "the camera firmware"],
    "travel": ["the flight", "the hotel", "the train journey", "the beach resort", "the city tour",
               "the cruise", "the campsite", "the museum visit", "the road trip", "the airport",
               "the ferry", "the guided hike"],
}
POSITIVE = ["wonderful", "excellent", "fantastic", "delightful", "superb", "impressive",
            "brilliant", "lovely", "outstanding", "great"]
NEGATIVE = ["awful", "terrible", "disappointing", "dreadful", "horrible", "mediocre",
            "frustrating", "poor", "miserable", "bad"]
AFFIRMATIVE = ["{x} was {a}.", "Honestly, {x} was {a}.", "My friends said {x} was {a}.",
               "I thought {x} was {a}.", "Everyone agreed that {x} was {a}.", "Last week {x} was {a}.",
               "{x} is really {a}.",
               # held out
               "In my opinion {x} turned out {a}.", "To be fair, {x} seemed {a}.", "Overall, {x} felt {a}."]
NEGATED = ["{x} was not {a}.", "Honestly, {x} was not {a}.", "I would not say {x} was {a}.",
           "{x} was far from {a}.", "Nobody thought {x} was {a}.",
           # held out
           "{x} never seemed {a}.", "It is not true that {x} was {a}.", "{x} did not feel {a} at all."]
N_TRAIN_AFF, N_TRAIN_NEG, N_TRAIN_SUBJ, N_VAL_SUBJ, N_TRAIN_ADJ = 7, 5, 7, 2, 6

SIMILARITY_SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "A kitten was napping in the sunshine by the window.",
    "Dogs need regular walks and plenty of exercise.",
    "The puppy chased the ball across the garden.",
    "The central bank raised interest rates again this quarter.",
    "Inflation figures came in higher than analysts expected.",
    "Stock markets fell sharply after the announcement.",
    "The company reported record profits for the year.",
    "Heavy rain flooded several streets in the town centre.",
    "A storm is expected to bring strong winds tonight.",
    "The sky was clear and the stars were bright.",
    "Snow covered the mountains by early November.",
    "She is learning to play the violin.",
    "He practises the piano every evening after dinner.",
    "The orchestra performed a symphony by Beethoven.",
    "The band released a new album last month.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Photosynthesis converts sunlight into chemical energy.",
    "The Earth orbits the Sun once a year.",
    "Electrons carry a negative electric charge.",
    "The museum opened a new exhibition on ancient Egypt.",
    "Archaeologists discovered a Roman coin near the river.",
    "The castle was built in the twelfth century.",
    "The novel tells the story of a family across three generations.",
    "The children built a sandcastle on the beach.",
    "Kids were playing football in the park.",
    "The students prepared for their final exams.",
    "The teacher explained the lesson with a diagram.",
    "The doctor recommended rest and plenty of fluids.",
    "The hospital opened a new emergency ward.",
    "Regular exercise improves heart health.",
    "He caught a cold after walking in the rain.",
    "The train to the capital was delayed by an hour.",
    "Traffic on the motorway was unusually heavy.",
    "She rode her bicycle to work every day.",
    "The airline cancelled dozens of flights.",
    "Fresh bread was baking in the oven.",
    "They grilled vegetables for lunch.",
    "The restaurant serves traditional Italian dishes.",
    "He drank a cup of strong black coffee.",
    "The programmer fixed a bug in the database code.",
    "The new smartphone has a larger screen.",
    "Engineers tested the bridge for safety.",
    "Solar panels were installed on the roof.",
    "The election results will be announced tomorrow.",
    "Parliament debated the new tax law.",
    "The mayor opened the new library.",
    "Volunteers cleaned up the litter along the river.",
]


def _sentences(subjects: list[str], adjectives: list[tuple[str, int]], templates: list[tuple[str, bool]]) -> list[tuple[str, int]]:
    out = []
    for x, (a, pol), (t, negated) in itertools.product(subjects, adjectives, templates):
        s = t.format(x=x, a=a)
        out.append((s[0].upper() + s[1:], pol ^ int(negated)))
    return out


@lru_cache(maxsize=1)
def build_splits() -> dict[str, list[tuple[str, int]]]:
    """Train pool, val and test sentences with labels (1 = positive); fixed."""
    adj_tr = [(a, 1) for a in POSITIVE[:N_TRAIN_ADJ]] + [(a, 0) for a in NEGATIVE[:N_TRAIN_ADJ]]
    adj_ho = [(a, 1) for a in POSITIVE[N_TRAIN_ADJ:]] + [(a, 0) for a in NEGATIVE[N_TRAIN_ADJ:]]
    tpl_tr = [(t, False) for t in AFFIRMATIVE[:N_TRAIN_AFF]] + [(t, True) for t in NEGATED[:N_TRAIN_NEG]]
    tpl_ho = [(t, False) for t in AFFIRMATIVE[N_TRAIN_AFF:]] + [(t, True) for t in NEGATED[N_TRAIN_NEG:]]
    s_tr = [s for v in SUBJECTS.values() for s in v[:N_TRAIN_SUBJ]]
    s_val = [s for v in SUBJECTS.values() for s in v[N_TRAIN_SUBJ:N_TRAIN_SUBJ + N_VAL_SUBJ]]
    s_te = [s for v in SUBJECTS.values() for s in v[N_TRAIN_SUBJ + N_VAL_SUBJ:]]
    rng = random.Random(1234)
    val = _sentences(s_val, adj_ho, tpl_ho)
    test = _sentences(s_te, adj_ho, tpl_ho)
    return {
        "train": _sentences(s_tr, adj_tr, tpl_tr),
        "val": rng.sample(val, min(N_VAL, len(val))),
        "test": rng.sample(test, min(N_TEST, len(test))),
    }


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    from frogwatch.sources import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


class SentenceClassifier(nn.Module):
    """MiniLM encoder + mean pooling + a linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


Encoder = Callable[[list[str]], dict[str, torch.Tensor]]


def _encode(texts: list[str]) -> dict[str, torch.Tensor]:
    b = _tokenizer()(texts, return_tensors="pt", padding=True)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _embeddings(model: SentenceClassifier, texts: list[str], bs: int = 64, encode: Encoder = _encode) -> torch.Tensor:
    return torch.cat([model.embed(**encode(texts[i:i + bs])) for i in range(0, len(texts), bs)])


def _classify(model: nn.Module, data: list[tuple[str, int]], bs: int = 64,
              encode: Encoder = _encode) -> tuple[float, float]:
    logits = torch.cat([model(**encode([s for s, _ in data[i:i + bs]])) for i in range(0, len(data), bs)])
    y = torch.tensor([lab for _, lab in data])
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _pair_cosines(E: torch.Tensor) -> torch.Tensor:
    E = F.normalize(E, dim=1)
    iu = torch.triu_indices(len(E), len(E), offset=1)
    return (E @ E.T)[iu[0], iu[1]]


@lru_cache(maxsize=1)
def _pretrained_encoder() -> nn.Module:
    from frogwatch.sources import load_default_model

    return load_default_model().eval()


def text_problem(task: str, model: SentenceClassifier, splits: dict[str, list[tuple[str, int]]], *,
                 encode: Encoder, batch: int, steps: int, lr_grid: dict[str, list[float]]) -> Problem:
    """A sentence-classification :class:`Problem` on ``model`` (shared by the MiniLM tasks).

    Targets: every ``nn.Linear`` of the encoder's layers; the head always trains.
    ``target_metric`` = test accuracy, ``source_metric`` = Spearman of the pairwise cosine
    similarities of :data:`SIMILARITY_SENTENCES`, fine-tuned vs ``model`` as given.
    """
    with torch.no_grad():
        ref_cos = _pair_cosines(_embeddings(model, SIMILARITY_SENTENCES, encode=encode)).numpy()
    train, val, test = splits["train"], splits["val"], splits["test"]
    modules = dict(model.named_modules())
    targets = [n for n, m in modules.items() if n.startswith("encoder.encoder.layer.") and isinstance(m, nn.Linear)]

    def train_batch(gen: torch.Generator):
        idx = torch.randint(len(train), (batch,), generator=gen).tolist()
        out = encode([train[i][0] for i in idx])
        out["labels"] = torch.tensor([train[i][1] for i in idx])
        return out

    def loss(m: nn.Module, b) -> torch.Tensor:
        return F.cross_entropy(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b["labels"])

    def evaluate(m: nn.Module) -> dict:
        val_acc, val_loss = _classify(m, val, encode=encode)
        test_acc, _ = _classify(m, test, encode=encode)
        cos = _pair_cosines(_embeddings(m, SIMILARITY_SENTENCES, encode=encode)).numpy()
        return {"val_metric": val_acc, "val_loss": val_loss, "target_metric": test_acc,
                "source_metric": float(spearmanr(ref_cos, cos).statistic)}

    return Problem(task=task, model=model, targets=targets, train_batch=train_batch, loss=loss,
                   evaluate=evaluate, higher_is_better=True, steps=steps, lr_grid=lr_grid,
                   always_trainable=("head.",), head_lr=3e-3)


def make_problem(seed: int, quick: bool = False) -> Problem:
    """The MiniLM problem for one seed (the seed sets the head init; data are fixed)."""
    import copy

    splits = build_splits()
    torch.manual_seed(40_000 + seed)
    model = SentenceClassifier(copy.deepcopy(_pretrained_encoder())).eval()
    if quick:  # a smoke test: smaller evaluation
        splits = {**splits, "val": splits["val"][:96], "test": splits["test"][:192]}
    return text_problem(
        "minilm", model, splits, encode=_encode, batch=BATCH, steps=20 if quick else 100,
        lr_grid={"sparse": [3e-3, 1e-2, 3e-2], "lora": [1e-3, 3e-3, 1e-2], "full": [2e-5, 5e-5, 1e-4],
                 "head": [3e-3, 1e-2, 3e-2]},
    )
