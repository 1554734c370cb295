"""An evaluation's figures beyond the book's accuracy: confusion matrix, precision and recall."""
import torch


def predicted(probs):
    """Each example's class, -1 where its outputs are not finite (argmax takes NaN as largest)."""
    return torch.where(probs.isfinite().all(1), probs.argmax(1), -1)


def figures(probs, labels, classes):
    """The confusion matrix, each class's precision, recall and F1, and the balanced accuracy."""
    preds, count = predicted(probs), torch.bincount(labels, minlength=len(classes)).double()
    answered = preds >= 0
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((labels[answered], preds[answered]), torch.ones_like(preds[answered]),
                         accumulate=True)
    right, predicted_as = confusion.diag().double(), confusion.sum(0).double()
    precision, recall = (torch.nan_to_num(right / n) for n in (predicted_as, count))  # 0: none
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    per_class = {name: dict(precision=p, recall=r, f1=f, count=int(n)) for name, p, r, f, n
                 in zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), count.tolist())}
    balanced = recall[count > 0].mean().item() if (count > 0).any() else 0.0
    return dict(confusion=confusion.tolist(), per_class=per_class, balanced_accuracy=balanced)
