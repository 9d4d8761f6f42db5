"""Reward modelling: pairwise labels from a gold scorer, the Bradley–Terry loss, the scalar-head
model, and the normalised scorer that RL and evaluation use.

The reward model is `AutoModelForSequenceClassification` (one label) on the SFT backbone, over
the prompt and answer in the SFT template (`ChatTemplate.pair`; plain: `BOS PROMPT prompt
RESPONSE response EOS`). Sequence lengths, not PAD ids, say where padding starts (PAD may equal
EOS). Its scalar head reads either the hidden state of the last non-pad token (`pooling: last`,
what plain transformers computes) or every response position, averaged (`pooling: mean`) or
summed (`pooling: sum`); the choice is stored in the model's config.json as
`lmpipe_reward_pooling`, so `scoring.sequence_scores` scores a saved model the way it was
trained. Its raw score r is normalised as gain·r + bias, fitted to mean 0, std 1 on fresh
samples of the SFT policy; the constants live in `lmpipe.json`.

Modules, each importing only those above it:
- `scoring`: sequence scores (pooling, shared prompts) and batched raw scores.
- `model`: the text the model reads, building it, the normalisation, `RewardModel`.
- `labels`: the noisy Bradley–Terry labeller.
- `metrics`: pair accuracy against labels and gold, calibration, clustered standard errors.
- `baseline`: the bag-of-words reference.
- `data`: encoded pairs, groups by prompt, batches, the train/val split, the JSONL source.
- `training`: the Bradley–Terry loss and the training run.
- `preferences`: the stage's pairs: SFT samples labelled by the gold scorer, or a file.
- `evaluation`: the stage's held-out metrics and the normalisation on fresh samples.
"""
