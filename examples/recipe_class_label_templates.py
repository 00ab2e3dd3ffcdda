"""Bansal & Grover on the embedded digits: text-only generations from the class label with a template drawn per
image, concatenated 1:1 with the real images (``mixing="concat"``).

    python examples/recipe_class_label_templates.py [--steps 300]
"""

from recipe_common import few_shot_digits, parse, train

from fusionloader import FusionLoader, recipes
from fusionloader.demo import RandomAffine
from fusionloader.pretrained import TRAIN_TEMPLATES

if __name__ == "__main__":
    args = parse(__doc__)
    train_set, test_x, test_y = few_shot_digits(args.per_class, args.seed)
    # The digits model's own templates stand in for CLIP's 80 (most of whose words it never saw).
    recipe = recipes.class_label_templates(templates=TRAIN_TEMPLATES, guidance_scale=3.0,
                                           num_inference_steps=args.sampler_steps)  # fmt: skip
    loader = FusionLoader(train_set, batch_size=16, shuffle=True, seed=args.seed, transform=RandomAffine(),
                          late_policy="wait", **recipe)  # fmt: skip
    with loader:
        train(loader, test_x, test_y, args.steps, args.seed)
