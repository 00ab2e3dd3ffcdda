"""DisCL on the embedded digits: diverse -> specific (strength 1 - lambda, lambda ascending per epoch, then real
only), hard samples weighted (every few-shot class is a tail class), the CLIP-score filter at 0.30.

    python examples/recipe_discl.py [--steps 300]
"""

from recipe_common import few_shot_digits, parse, train

from fusionloader import FusionLoader, recipes
from fusionloader.demo import RandomAffine
from fusionloader.pretrained import PROMPT_TEMPLATE

if __name__ == "__main__":
    args = parse(__doc__)
    train_set, test_x, test_y = few_shot_digits(args.per_class, args.seed)
    recipe = recipes.discl(template=PROMPT_TEMPLATE, guidance_scale=3.0, num_inference_steps=max(10, args.sampler_steps))
    loader = FusionLoader(train_set, batch_size=16, shuffle=True, seed=args.seed, transform=RandomAffine(),
                          late_policy="wait", **recipe)  # fmt: skip
    with loader:
        train(loader, test_x, test_y, args.steps, args.seed, curriculum=recipe.curriculum)
