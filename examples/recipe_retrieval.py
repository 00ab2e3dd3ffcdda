"""Burg & Wenzel on the embedded digits: nearest neighbours of each class prompt from the generator's own
training split (the embedded CLIP-style encoder), served at alpha 0.5 instead of generated images.

    python examples/recipe_retrieval.py [--steps 300]
"""

from recipe_common import few_shot_digits, parse, train

from fusionloader import FusionLoader, recipes
from fusionloader.demo import RandomAffine

if __name__ == "__main__":
    args = parse(__doc__)
    train_set, test_x, test_y = few_shot_digits(args.per_class, args.seed)
    recipe = recipes.retrieval(held_out_images=test_x)  # neighbours of the test images are removed from the pool
    loader = FusionLoader(train_set, batch_size=16, shuffle=True, seed=args.seed, transform=RandomAffine(), **recipe)
    with loader:
        train(loader, test_x, test_y, args.steps, args.seed)
