import _src_path  # noqa: F401  (puts the repository's src/ first on sys.path: docs/hpc.md)

from cellstage.exclusion import drop_excluded
from cellstage.segment.stage import train_segmenter
from cellstage.utils import redirect_output

with redirect_output(snakemake.log[0]):
    # slides excluded upstream (require_all_slides: false) are left out and listed
    inputs, excluded = drop_excluded(snakemake, pairs={"slides": "masks"})
    train_segmenter(
        list(inputs.slides),
        list(inputs.masks),
        snakemake.output.model,
        snakemake.output.ap,
        pretrained=snakemake.params.pretrained,
        diameter=snakemake.params.diameter,
        epochs=snakemake.params.epochs,
        learning_rate=snakemake.params.learning_rate,
        batch_size=snakemake.params.batch_size,
        bsize=snakemake.params.bsize,
        diam_mean=snakemake.params.diam_mean,
        nimg_per_epoch=snakemake.params.nimg_per_epoch,
        eval_tiles=snakemake.params.eval_tiles,
        seed=snakemake.params.seed,
        threads=snakemake.threads,
    )
