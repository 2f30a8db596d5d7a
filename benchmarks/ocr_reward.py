"""The OCR reward side by side with rapidocr on rendered 512 px images: agreement and images/s.

  python benchmarks/ocr_reward.py                        # 120 images, the "paddleocr" preset, CPU
  python benchmarks/ocr_reward.py --preset=rapidocr --images=200 --batch=16
  python benchmarks/ocr_reward.py --rapidocr-cuda        # the reference on onnxruntime-gpu, where installed

flowjax runs `reward.read(images, prompts)` (detector, host box post-processing, recogniser, the reward
rule) in batches after one warm-up batch (compilation is not timed); rapidocr runs its own pipeline image by
image without the angle classifier, configured like the preset. Both see the same uint8 images. The last
line is a JSON summary. Needs the [ocr] extra, onnxruntime and rapidocr-onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import ocr_reference  # noqa: E402

from flowjax.rewards.ocr import OCRReward, flow_grpo_reward, ocr_target  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paddleocr", choices=["paddleocr", "rapidocr"])
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rapidocr-cuda", action="store_true", help="run rapidocr's sessions on CUDA")
    args = ap.parse_args()

    data = ocr_reference.dataset(args.images, seed=args.seed)
    reward = OCRReward(preset=args.preset)
    engine = ocr_reference.rapidocr_engine(args.preset)
    if args.rapidocr_cuda:
        from rapidocr_onnxruntime import RapidOCR

        engine = RapidOCR(det_use_cuda=True, rec_use_cuda=True)
    batches = [data[i:i + args.batch] for i in range(0, len(data), args.batch)]
    as_array = lambda chunk: np.stack([im for im, _ in chunk]).astype(np.float32) / 255.0

    reward.read(as_array(batches[0]), [p for _, p in batches[0]])  # compile
    texts, rewards = [], []
    start = time.perf_counter()
    for chunk in batches:
        out = reward.read(as_array(chunk), [p for _, p in chunk])
        texts += out["text"]
        rewards += list(out["reward"])
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    refs = [ocr_reference.rapidocr_read(engine, im) for im, _ in data]
    t_ref = time.perf_counter() - start

    ref_rewards = [flow_grpo_reward(r, ocr_target(p)) for r, (_, p) in zip(refs, data)]
    agree = float(np.mean([a == b for a, b in zip(texts, refs)]))
    diff = float(np.mean(np.abs(np.asarray(rewards) - np.asarray(ref_rewards))))
    for a, b, (_, p) in zip(texts, refs, data):
        if a != b:
            print(f"differs: flowjax {a!r} rapidocr {b!r} ({p})")
    summary = dict(preset=args.preset, images=len(data), batch=args.batch, device=str(jax.devices()[0]),
                   agreement=agree, mean_abs_reward_diff=diff, flowjax_images_per_s=len(data) / t_ours,
                   rapidocr_images_per_s=len(data) / t_ref, mean_reward=float(np.mean(rewards)))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
