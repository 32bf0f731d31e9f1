"""peft's p-tuning tutorial (README "P-tuning quick start"): SEQ_CLS on a RoBERTa-large-shaped model.

The full-size test builds RoBERTa-large's shape (24 layers, hidden 1024, 355M random weights) with
batch 2 x seq 8: about 25 s on two CPU cores, hence the `slow` marker (deselect with -m "not slow").
The small test runs the same steps on a tiny RoBERTa.
"""
import copy

import pytest
import torch

from fastpeft import PeftModel, PromptEncoderConfig, TaskType, get_peft_model


def _tutorial_run(base, peft_config, tmp_path, vocab):
    reference = copy.deepcopy(base)  # the untouched base model to load the adapter into later
    model = get_peft_model(base, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.tensor([0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, str(tmp_path))
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-5)
    return trainable, total


def test_tutorial_steps_tiny(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=72, num_labels=2)
    peft_config = PromptEncoderConfig(encoder_reparameterization_type="MLP", encoder_hidden_size=16,
                                      num_attention_heads=4, num_layers=2, num_transformer_submodules=1,
                                      num_virtual_tokens=20, token_dim=32, task_type=TaskType.SEQ_CLS)
    trainable, _ = _tutorial_run(T.RobertaForSequenceClassification(cfg), peft_config, tmp_path, 64)
    # prompt table 20x32 + MLP (32->16->16->32) + classifier copy (32x32+32 + 32x2+2)
    assert trainable == 20 * 32 + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)


@pytest.mark.slow
def test_tutorial_roberta_large_shape(tmp_path, capsys):
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
    peft_config = PromptEncoderConfig(encoder_reparameterization_type="MLP", encoder_hidden_size=128,
                                      num_attention_heads=16, num_layers=24, num_transformer_submodules=1,
                                      num_virtual_tokens=20, token_dim=1024, task_type=TaskType.SEQ_CLS)
    trainable, total = _tutorial_run(T.RobertaForSequenceClassification(cfg), peft_config, tmp_path, 50265)
    # the numbers peft prints for this tutorial
    assert (trainable, total) == (1_351_938, 356_713_732)
