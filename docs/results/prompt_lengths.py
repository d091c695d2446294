"""The reasoning-gym generators with a classification view (2 to 16 distinct answers) that the default-recipe
protocol did not use, with their prompt lengths: why none is left to check the default on (docs/results.md).

    python docs/results/prompt_lengths.py     # reasoning-gym 0.1.25, 300 examples per generator, seed 1
"""

from __future__ import annotations

import statistics
from collections import Counter

import reasoning_gym

from lora_tsd.app.assets.tasks.rgym import MAX_CLASSES

UNUSED = ("acre", "game_of_life_halting", "mahjong_puzzle", "rectangle_count", "rotten_oranges")

if __name__ == "__main__":
    print("| generator | distinct answers | majority share | mean words per prompt |")
    print("|---|---|---|---|")
    for name in UNUSED:
        examples = list(reasoning_gym.create_dataset(name, size=300, seed=1))
        answers = Counter(str(e["answer"]) for e in examples)
        assert 2 <= len(answers) <= MAX_CLASSES, name
        words = statistics.mean(len(e["question"].split()) for e in examples)
        print(f"| {name} | {len(answers)} | {answers.most_common(1)[0][1] / len(examples):.2f} | {words:.0f} |")
