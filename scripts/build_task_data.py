"""Convert the published prompt data into the package's task files (run once; output is committed).

    python scripts/build_task_data.py SOURCE_DIR

SOURCE_DIR holds `clip_prompts.md` (CLIP paper's class names + templates),
`generation_prompts.json` (the name-only paper's generation template and CoOp-style class
names) and `cupl/<task>.json` (CuPL descriptions). Output: `regft/data/tasks/<task>.json` and
`regft/data/cupl/<task>.json`.

Label order: the generation/CoOp lists follow the real datasets' label order (torchvision /
CoOp splits), so they define the order. CLIP's names are used for the zero-shot text where
CLIP's list is the same classes in the same order (one-to-one by position, checked below);
for Oxford Pets, EuroSAT and Caltech101 CLIP's lists differ in order or content, so the
CoOp names are used for both.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

# task -> (generation_prompts key, clip_prompts.md section, cupl file, dataset title)
TASKS = {
    "cars": ("stanford_cars", "StanfordCars", "stanford_cars", "Stanford Cars"),
    "aircraft": ("fgvc_aircraft", "FGVCAircraft", "fgvc", "FGVC Aircraft"),
    "pets": ("oxford_pets", "OxfordPets", "oxford_pets", "Oxford-IIIT Pets"),
    "flowers": ("oxford_flowers", "Flowers102", "oxford_flowers", "Oxford Flowers102"),
    "food101": ("food-101", "Food101", "food101", "Food-101"),
    "dtd": ("dtd", "DescribableTextures", "dtd", "Describable Textures"),
    "eurosat": ("eurosat", "EuroSAT", "eurosat", "EuroSAT"),
    "caltech101": ("caltech-101", "Caltech101", "caltech", "Caltech101"),
    "sun397": ("sun397", "SUN397", "sun397", "SUN397"),
    "ucf101": ("ucf101", "UCF101", "ucf101", "UCF101"),
    "imagenet": ("imagenet", None, None, "ImageNet-1k"),
}
CLIP_ORDER_DIFFERS = {"pets", "eurosat", "caltech101"}


def parse_clip_prompts(text: str) -> dict[str, tuple[list[str], list[str]]]:
    out = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        name = section.split("\n", 1)[0].strip()
        m = re.search(r"classes = (\[.*?\])\s*\n\s*templates = (\[.*?\])", section, re.S)
        if m:
            out[name] = (ast.literal_eval(m.group(1)), ast.literal_eval(m.group(2)))
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[0])
    pkg = Path(__file__).resolve().parents[1] / "regft" / "data"
    clip = parse_clip_prompts((src / "clip_prompts.md").read_text())
    gen = json.loads((src / "generation_prompts.json").read_text())
    for task, (gkey, ckey, cupl, title) in TASKS.items():
        gnames = gen[gkey]["classnames"]
        record = {
            "name": task,
            "title": title,
            "generation_template": gen[gkey]["template"],
            "generation_classnames": gnames,
        }
        if ckey is None:  # ImageNet: names and templates come from open_clip at load time
            record["classnames_source"] = "open_clip.zero_shot_metadata"
            record["wnids"] = gen[gkey]["save_subdir"]
        else:
            cnames, templates = clip[ckey]
            if task in CLIP_ORDER_DIFFERS:
                record["classnames"] = gnames
                record["classnames_source"] = "generation_prompts.json (CoOp order)"
            else:
                assert len(cnames) == len(gnames), task
                record["classnames"] = cnames
                record["classnames_source"] = f"clip_prompts.md section {ckey}"
            record["templates"] = templates
        if cupl:
            desc = json.loads((src / "cupl" / f"{cupl}.json").read_text())
            assert set(desc) == set(gnames), task
            record["descriptions"] = f"cupl/{task}.json"
            # keyed by generation class name; stored in label order
            (pkg / "cupl" / f"{task}.json").write_text(
                json.dumps({n: desc[n] for n in gnames}, indent=0, ensure_ascii=False) + "\n"
            )
        (pkg / "tasks" / f"{task}.json").write_text(
            json.dumps(record, indent=1, ensure_ascii=False) + "\n"
        )
        print(task, len(gnames))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
