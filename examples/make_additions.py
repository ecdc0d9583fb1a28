"""Write examples/data/additions.jsonl: every "What is a + b?" with 0 <= a, b <= 30 (961
problems) in GSM8K's format ("a + b = c\\n#### c"), the data of examples/smollm2_math.toml.

    python examples/make_additions.py
"""
import json
from pathlib import Path

out = Path(__file__).resolve().parent / "data" / "additions.jsonl"
out.parent.mkdir(exist_ok=True)
with open(out, "w") as f:
    for a in range(31):
        for b in range(31):
            f.write(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
print(f"wrote {out}")
