"""Real Guidance (DA-Fusion's baseline) on the embedded digits: class-name prompt, strength 0.5, alpha 0.5.

    python examples/recipe_real_guidance.py [--steps 300]
"""

from recipe_common import few_shot_digits, parse, train

from fusionloader import FusionLoader, recipes
from fusionloader.demo import RandomAffine
from fusionloader.pretrained import PROMPT_TEMPLATE

if __name__ == "__main__":
    args = parse(__doc__)
    train_set, test_x, test_y = few_shot_digits(args.per_class, args.seed)
    recipe = recipes.real_guidance(template=PROMPT_TEMPLATE, guidance_scale=3.0, num_inference_steps=args.sampler_steps)
    loader = FusionLoader(train_set, batch_size=16, shuffle=True, seed=args.seed, transform=RandomAffine(),
                          late_policy="wait", **recipe)  # fmt: skip
    with loader:
        train(loader, test_x, test_y, args.steps, args.seed)
