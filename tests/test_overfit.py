"""A small model overfits one synthetic image: the loss falls > 5x and each object is found."""
from helpers import overfit_scene, train_on_overfit_scene


def test_overfit_one_image():
    img, masks, labels = overfit_scene()
    model, history = train_on_overfit_scene(60)
    assert history[0] / min(history[-5:]) > 5, history

    result = model.predict(img)[0]
    for k in range(3):
        ious = [float((result.masks[j] & masks[k].bool()).sum()) / float((result.masks[j] | masks[k].bool()).sum())
                for j in range(len(result)) if int(result.labels[j]) == int(labels[k])]
        assert ious and max(ious) > 0.5, f"object {k}: IoUs {ious} (labels {result.labels.tolist()})"
