"""Images on the same diffusion core: data (scikit-learn's digits, folders of images) and offline
quality metrics from a small digit classifier trained here (FID, KID, precision / recall,
class accuracy), and pre-training of every model family with one entry point."""
from .data import augment, image_grid, load_digits, load_image_folder
from .metrics import DigitClassifier, ImageMetrics, frechet_distance, kid, precision_recall
from .pretrain import (FAMILIES, ImagePretrainConfig, load_image_model, load_pretrained, make_image_denoiser, pretrain_images,
                       sample_images)

__all__ = ["load_digits", "load_image_folder", "augment", "image_grid", "DigitClassifier", "ImageMetrics", "frechet_distance",
           "kid", "precision_recall", "FAMILIES", "ImagePretrainConfig", "load_image_model", "load_pretrained", "make_image_denoiser",
           "pretrain_images",
           "sample_images"]
