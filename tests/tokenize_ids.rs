//! Token ids and loss masks equal what the `tokenizers` library and the documented chat
//! templates give, end to end through `stages::tokenize::run` and `read_shards`.

mod tokenize_util;

use tokenize_util::{ids, reference_tokenizer, Workspace};

#[test]
fn fixture_row_matches_reference_input_ids() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tokenize_util::fixture_dir().join("../expected/input_ids.json"))
            .unwrap(),
    )
    .unwrap();
    let text = expected["text_row0"].as_str().unwrap();
    let row0: Vec<u32> = expected["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ws = Workspace::new();
    ws.write("data/one.txt", format!("{text}\n"));
    ws.run(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/one.txt}\nseq_len: 16\n\
         packing: false\nadd_bos: false\nadd_eos: false\nsplit: {valid: 0}\n",
    )
    .unwrap();
    let rows = ws.rows("train");
    assert_eq!(
        rows[0].input_ids, row0,
        "first 16 ids equal the reference batch's row 0"
    );
    // And the rows together are exactly the tokenizers crate's encoding of the text.
    let all: Vec<u32> = rows.iter().flat_map(|r| r.input_ids.clone()).collect();
    assert_eq!(all, ids(&reference_tokenizer(), text));
    assert!(rows.iter().all(|r| r.loss_mask.iter().all(|m| *m)));
    assert!(ws.rows("valid").is_empty());
}

#[test]
fn bos_and_eos_come_from_tokenizer_config() {
    let ws = Workspace::new();
    ws.write("data/a.txt", "hello world\n");
    let summary = ws
        .run("tokenizer: tok/tokenizer.json\nsource: {path: data/a.txt}\nsplit: {valid: 0}\n")
        .unwrap();
    let rows = ws.rows("train");
    let body = ids(&reference_tokenizer(), "hello world");
    let mut expected = vec![1];
    expected.extend(&body);
    expected.push(2);
    assert_eq!(rows[0].input_ids, expected);
    // BOS is never a target; text tokens and EOS are.
    let mut mask = vec![false];
    mask.extend(vec![true; body.len() + 1]);
    assert_eq!(rows[0].loss_mask, mask);
    assert_eq!(summary.train.tokens, expected.len() as u64);
    assert_eq!(summary.train.loss_tokens, body.len() as u64 + 1);
}

/// The exact ChatML text of the two-turn conversation used below.
const CHATML: &str = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
<|im_start|>assistant\nSee you.<|im_end|>\n";

const CHAT_LINE: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]}"#;

/// Pieces of `CHATML` and whether each is trained, written out by hand from the template.
const CHATML_PIECES: [(&str, bool); 5] = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", false),
    ("Hello!<|im_end|>", true),
    ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", false),
    ("See you.<|im_end|>", true),
    ("\n", false),
];

#[test]
fn chatml_two_turns_ids_and_mask_by_hand() {
    let pieces: String = CHATML_PIECES.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        pieces, CHATML,
        "the hand-written pieces are the template text"
    );
    let tok = reference_tokenizer();
    let (mut want_ids, mut want_mask) = (vec![1u32], vec![false]);
    for (text, trained) in CHATML_PIECES {
        let piece = ids(&tok, text);
        want_mask.extend(vec![trained; piece.len()]);
        want_ids.extend(piece);
    }
    want_ids.push(2);
    want_mask.push(true); // the conversation ends with an assistant turn

    let ws = Workspace::new();
    ws.write("data/chat.jsonl", format!("{CHAT_LINE}\n"));
    ws.run(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/chat.jsonl}\nfield: messages\n\
         chat_template: chatml\nsplit: {valid: 0}\n",
    )
    .unwrap();
    let rows = ws.rows("train");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].input_ids, want_ids);
    assert_eq!(rows[0].loss_mask, want_mask);
    // Decoding gives back exactly BOS + template text + EOS.
    let text = tok.decode(&rows[0].input_ids, false).unwrap();
    assert_eq!(text, format!("<s>{CHATML}</s>"));
}

#[test]
fn chatml_with_real_special_tokens_equals_whole_string_tokenization() {
    // Give the tokenizer <|im_start|> and <|im_end|> as special tokens, as a real ChatML
    // tokenizer has them: then piecewise tokenization equals tokenizing the whole text.
    let ws = Workspace::new();
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ws.path().join("tok/tokenizer.json")).unwrap(),
    )
    .unwrap();
    for (id, content) in [(512, "<|im_start|>"), (513, "<|im_end|>")] {
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    }
    ws.write("tok/tokenizer.json", serde_json::to_string(&json).unwrap());
    ws.write("data/chat.jsonl", format!("{CHAT_LINE}\n"));
    ws.run(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/chat.jsonl}\nfield: messages\n\
         add_bos: false\nadd_eos: false\nsplit: {valid: 0}\n",
    )
    .unwrap();
    let tok = tokenizers::Tokenizer::from_file(ws.path().join("tok/tokenizer.json")).unwrap();
    let whole = ids(&tok, CHATML);
    let rows = ws.rows("train");
    assert_eq!(rows[0].input_ids, whole);
    // Trained tokens: exactly "Hello!<|im_end|>" and "See you.<|im_end|>".
    let trained: Vec<u32> = rows[0]
        .input_ids
        .iter()
        .zip(&rows[0].loss_mask)
        .filter(|(_, m)| **m)
        .map(|(i, _)| *i)
        .collect();
    let mut want = ids(&tok, "Hello!<|im_end|>");
    want.extend(ids(&tok, "See you.<|im_end|>"));
    assert_eq!(trained, want);
    assert_eq!(want.iter().filter(|i| **i == 513).count(), 2);
}

#[test]
fn llama3_template_text_is_exact() {
    let ws = Workspace::new();
    ws.write("data/chat.jsonl", format!("{CHAT_LINE}\n"));
    ws.run(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/chat.jsonl}\nfield: messages\n\
         chat_template: llama3\nadd_bos: false\nadd_eos: false\nsplit: {valid: 0}\n",
    )
    .unwrap();
    let tok = reference_tokenizer();
    let rows = ws.rows("train");
    let text = tok.decode(&rows[0].input_ids, false).unwrap();
    assert_eq!(
        text,
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nSee you.<|eot_id|>"
    );
    let trained: Vec<u32> = rows[0]
        .input_ids
        .iter()
        .zip(&rows[0].loss_mask)
        .filter(|(_, m)| **m)
        .map(|(i, _)| *i)
        .collect();
    let mut want = ids(&tok, "Hello!<|eot_id|>");
    want.extend(ids(&tok, "See you.<|eot_id|>"));
    assert_eq!(trained, want);
}

#[test]
fn prompt_completion_masks_the_prompt() {
    let ws = Workspace::new();
    ws.write("data/pc.jsonl", "{\"q\": \"2+2=\", \"a\": \"4\"}\n");
    ws.run(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/pc.jsonl}\n\
         field: {prompt: q, completion: a}\nsplit: {valid: 0}\n",
    )
    .unwrap();
    let tok = reference_tokenizer();
    let (p, c) = (ids(&tok, "2+2="), ids(&tok, "4"));
    let mut want_ids = vec![1];
    want_ids.extend(&p);
    want_ids.extend(&c);
    want_ids.push(2);
    let mut want_mask = vec![false; 1 + p.len()];
    want_mask.extend(vec![true; c.len() + 1]);
    let rows = ws.rows("train");
    assert_eq!(rows[0].input_ids, want_ids);
    assert_eq!(rows[0].loss_mask, want_mask);
}

#[test]
fn add_bos_true_without_a_bos_token_is_a_clear_error() {
    let ws = Workspace::new();
    ws.write(
        "tok/tokenizer_config.json",
        r#"{"bos_token": null, "eos_token": "</s>"}"#,
    );
    ws.write("data/a.txt", "x\n");
    let yaml = "tokenizer: tok/tokenizer.json\nsource: {path: data/a.txt}\nadd_bos: true\n";
    let err = ws.run(yaml).unwrap_err().to_string();
    assert!(
        err.contains("`add_bos: true` but the tokenizer has no BOS token"),
        "{err}"
    );
    assert!(err.contains("bos_token: null"), "{err}");
    // Left at its default, add_bos quietly adds nothing when there is no BOS.
    ws.run_in(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/a.txt}\nsplit: {valid: 0}\n",
        "out2",
        1,
    )
    .unwrap();
    let rows = tokenize_util_rows(&ws, "out2");
    assert_eq!(
        rows[0].input_ids.first(),
        ids(&reference_tokenizer(), "x").first()
    );
}

#[test]
fn add_bos_token_false_in_tokenizer_config_means_no_bos_unless_asked() {
    // SmolLM2 (and its GGUF import): BOS is `<|im_start|>`, which a chat already starts
    // with; `add_bos_token: false` says the text does not get another one.
    let ws = Workspace::new();
    ws.write(
        "tok/tokenizer_config.json",
        r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": false}"#,
    );
    ws.write("data/a.txt", "hello world\n");
    let body = ids(&reference_tokenizer(), "hello world");
    ws.run("tokenizer: tok/tokenizer.json\nsource: {path: data/a.txt}\nsplit: {valid: 0}\n")
        .unwrap();
    let mut want = body.clone();
    want.push(2);
    assert_eq!(ws.rows("train")[0].input_ids, want, "no BOS, EOS kept");
    // The stage's own `add_bos: true` still wins.
    ws.run_in(
        "tokenizer: tok/tokenizer.json\nsource: {path: data/a.txt}\nsplit: {valid: 0}\n\
         add_bos: true\n",
        "out2",
        1,
    )
    .unwrap();
    assert_eq!(tokenize_util_rows(&ws, "out2")[0].input_ids[0], 1);
}

fn tokenize_util_rows(ws: &Workspace, out: &str) -> Vec<taper::stages::tokenize::Row> {
    ws.rows_with_ids(out, "train")
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}
