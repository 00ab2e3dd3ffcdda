"""DA-Fusion on the embedded digits: a token per class learned by textual inversion on the few-shot images,
randomized intensity {0.25, 0.5, 0.75, 1.0}, alpha 0.5, the leakage guard on.

    python examples/recipe_da_fusion.py [--steps 300] [--inversion-steps 200]
"""

import sys

from recipe_common import few_shot_digits, parse, train

from fusionloader import FusionLoader, recipes
from fusionloader.demo import RandomAffine
from fusionloader.pretrained import PROMPT_TEMPLATE, class_names

if __name__ == "__main__":
    inversion = 200
    if "--inversion-steps" in sys.argv:  # this script's own flag, before the shared parser
        i = sys.argv.index("--inversion-steps")
        inversion = int(sys.argv[i + 1])
        del sys.argv[i : i + 2]
    args = parse(__doc__)
    train_set, test_x, test_y = few_shot_digits(args.per_class, args.seed)
    by_class = {name: train_set.images[train_set.labels == c] for c, name in enumerate(class_names)}
    recipe = recipes.da_fusion(images_by_class=by_class, inversion_steps=inversion, template=PROMPT_TEMPLATE,
                               guidance_scale=3.0, num_inference_steps=args.sampler_steps, seed=args.seed)  # fmt: skip
    loader = FusionLoader(train_set, batch_size=16, shuffle=True, seed=args.seed, transform=RandomAffine(),
                          late_policy="wait", **recipe)  # fmt: skip
    with loader:
        train(loader, test_x, test_y, args.steps, args.seed)
