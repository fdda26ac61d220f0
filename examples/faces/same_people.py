"""Checks that Olivetti and AT&T/ORL are the same 40 people (indeed the same 400 photos, cropped differently).

For every person it takes one Olivetti photo and finds the best-correlating crop of (a) the ORL photo
with the same person and photo number, (b) that person's other ORL photos, (c) the same-numbered ORL
photo of four other people. Same photo >> other people means one person; same photo > same person's
other photos means one photograph.

    python examples/faces/same_people.py [--data-dir ../shared/datasets]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from fedlearn.faces.data import crop_match, load_raw_pair

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--others", type=int, default=4, help="other people compared per person")
    args = parser.parse_args()
    torch.set_num_threads(1)
    olivetti, orl = load_raw_pair(args.data_dir)
    same_photo, same_person, other_people, photo_wins, person_wins = [], [], [], 0, 0
    for person in range(40):
        photo = person % 10
        index = person * 10 + photo
        own = crop_match(olivetti[index], orl[index], step=4)
        siblings = max(crop_match(olivetti[index], orl[person * 10 + p], step=4) for p in range(10) if p != photo)
        strangers = max(crop_match(olivetti[index], orl[((person + 1 + 9 * j) % 40) * 10 + photo], step=4)
                        for j in range(args.others))
        same_photo.append(own)
        same_person.append(siblings)
        other_people.append(strangers)
        photo_wins += own > siblings
        person_wins += max(own, siblings) > strangers
        print(f"person {person:2d} photo {photo + 1:2d}: same photo {own:.3f}, same person's best other photo "
              f"{siblings:.3f}, best of {args.others} other people {strangers:.3f}", flush=True)
    print(f"\nmean correlation: same photo {statistics.fmean(same_photo):.3f} (min {min(same_photo):.3f}), "
          f"same person other photos {statistics.fmean(same_person):.3f}, other people "
          f"{statistics.fmean(other_people):.3f} (max {max(other_people):.3f})")
    print(f"the person's own ORL photos beat every other person for {person_wins}/40 people; "
          f"the same-numbered photo is the best of the person's ten for {photo_wins}/40")


if __name__ == "__main__":
    main()
