"""Write the demo prompt set: topics x task templates, split into train and held-out.

The demo pair (SmolLM2-135M-Instruct and a DPO LoRA trained for concise answers)
needs prompts the project writes itself, so nothing is downloaded. Each prompt is
one topic dropped into one task template; the split is a seeded shuffle, so the
file is the same on every run.

    python scripts/demo_prompts.py            # writes dera_gguf/data/demo_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "dera_gguf" / "data" / "demo_prompts.jsonl"

TOPICS = [
    "photosynthesis",
    "black holes",
    "the water cycle",
    "volcanoes",
    "vaccines",
    "the French Revolution",
    "the printing press",
    "the Roman Empire",
    "the Silk Road",
    "climate change",
    "recycling",
    "electric cars",
    "solar panels",
    "the internet",
    "machine learning",
    "password security",
    "public libraries",
    "coffee",
    "bread baking",
    "gardening",
    "running",
    "sleep",
    "meditation",
    "learning a new language",
    "chess",
    "jazz music",
    "the ocean",
    "honeybees",
    "the Moon",
    "rainbows",
    "saving money",
    "job interviews",
    "teamwork",
    "time management",
    "bicycles",
    "earthquakes",
    "dinosaurs",
    "the human heart",
    "friendship",
    "city parks",
]

TEMPLATES = [
    "Explain {topic} to a ten-year-old.",
    "What is the most important thing to know about {topic}?",
    "Write a short paragraph about {topic}.",
    "Give me three facts about {topic}.",
    "Why should people care about {topic}?",
    "Describe {topic} in simple words.",
    "What are the pros and cons of {topic}?",
    "Write a haiku about {topic}.",
    "Summarize the history of {topic}.",
    "Give me some tips related to {topic}.",
    "What is a common misconception about {topic}?",
    "Tell me something surprising about {topic}.",
]


def build_prompts() -> list[dict]:
    """Every topic in every template, in a fixed order, each with a stable id."""
    rows = []
    for t_idx, template in enumerate(TEMPLATES):
        for p_idx, topic in enumerate(TOPICS):
            rows.append(
                {
                    "id": f"t{t_idx:02d}-p{p_idx:02d}",
                    "topic": topic,
                    "template": t_idx,
                    "prompt": template.format(topic=topic),
                }
            )
    return rows


def assign_split(rows: list[dict], n_heldout: int, seed: int) -> list[dict]:
    """Mark ``n_heldout`` rows, drawn by a seeded shuffle, as held-out; the rest train."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    heldout = set(order[:n_heldout])
    return [dict(row, split="heldout" if i in heldout else "train") for i, row in enumerate(rows)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def load_prompts(path: Path = DEFAULT_OUT, split: str | None = None) -> list[dict]:
    """Read the prompt file, optionally keeping one split ("train" or "heldout")."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="jsonl file to write")
    parser.add_argument("--heldout", type=int, default=60, help="number of held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split shuffle")
    args = parser.parse_args()
    rows = assign_split(build_prompts(), args.heldout, args.seed)
    write_jsonl(rows, args.out)
    n_train = sum(r["split"] == "train" for r in rows)
    print(f"wrote {len(rows)} prompts ({n_train} train, {len(rows) - n_train} held-out) to {args.out}")


if __name__ == "__main__":
    main()
