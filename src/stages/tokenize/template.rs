//! Chat templates and prompt masking: turns a record's content into a list of text pieces,
//! each marked trained (its tokens count toward the loss) or not.
//!
//! Each piece is tokenized on its own and the ids concatenated (see [`super::encode`]);
//! consecutive pieces with the same mark are merged first, so a piece boundary is exactly a
//! mask boundary. With real chat tokenizers the template markers are special tokens, which
//! the tokenizer splits on anyway, so this gives the same ids as tokenizing the whole
//! rendered string; with a tokenizer that lacks them, merges never cross a mask boundary.

use super::config::ChatTemplate;
use super::record::{Content, Message, Role};

/// A run of text and whether its tokens count toward the loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Piece {
    pub text: String,
    pub trained: bool,
}

/// A record rendered for tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rendered {
    pub pieces: Vec<Piece>,
    /// Whether an EOS added after the example counts toward the loss: true for plain text
    /// and completions, and for a chat whose last message is trained.
    pub eos_trained: bool,
}

/// Renders `content`. `template` is used for chats (callers pass the resolved template);
/// with `mask_prompt` false every piece is trained.
pub(crate) fn render(content: &Content, template: ChatTemplate, mask_prompt: bool) -> Rendered {
    let mut out = Builder::default();
    let mut eos_trained = true;
    match content {
        Content::Text(text) => out.push(text, true),
        Content::PromptCompletion { prompt, completion } => {
            out.push(prompt, !mask_prompt);
            out.push(completion, true);
        }
        Content::Chat(messages) => {
            for message in messages {
                let trained = !mask_prompt || message.role == Role::Assistant;
                render_message(&mut out, template, message, trained, !mask_prompt);
                eos_trained = trained;
            }
        }
    }
    Rendered {
        pieces: out.pieces,
        eos_trained,
    }
}

/// Appends one message in `template`'s format: its content and end marker marked
/// `trained`, its header and separators marked `markup` (true only without prompt masking).
fn render_message(
    out: &mut Builder,
    template: ChatTemplate,
    message: &Message,
    trained: bool,
    markup: bool,
) {
    let role = message.role.as_str();
    match template {
        ChatTemplate::Chatml => {
            out.push(&format!("<|im_start|>{role}\n"), markup);
            out.push(&message.content, trained);
            out.push("<|im_end|>", trained);
            out.push("\n", markup);
        }
        ChatTemplate::Llama3 => {
            // Meta's Llama 3.1 template names the tool role `ipython`.
            let role = if message.role == Role::Tool {
                "ipython"
            } else {
                role
            };
            out.push(
                &format!("<|start_header_id|>{role}<|end_header_id|>\n\n"),
                markup,
            );
            out.push(message.content.trim(), trained);
            out.push("<|eot_id|>", trained);
        }
        ChatTemplate::Plain => out.push(&message.content, trained),
    }
}

/// Collects pieces, merging neighbours with the same mark and dropping empty text.
#[derive(Default)]
struct Builder {
    pieces: Vec<Piece>,
}

impl Builder {
    fn push(&mut self, text: &str, trained: bool) {
        if text.is_empty() {
            return;
        }
        match self.pieces.last_mut() {
            Some(last) if last.trained == trained => last.text.push_str(text),
            _ => self.pieces.push(Piece {
                text: text.to_string(),
                trained,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> Content {
        let m = |role, content: &str| Message {
            role,
            content: content.to_string(),
        };
        Content::Chat(vec![
            m(Role::System, "Be brief."),
            m(Role::User, "Hi"),
            m(Role::Assistant, "Hello!"),
            m(Role::User, "Bye"),
            m(Role::Assistant, " See you. "),
        ])
    }

    fn whole(r: &Rendered) -> String {
        r.pieces.iter().map(|p| p.text.as_str()).collect()
    }

    fn trained(r: &Rendered) -> Vec<&str> {
        r.pieces
            .iter()
            .filter(|p| p.trained)
            .map(|p| p.text.as_str())
            .collect()
    }

    #[test]
    fn chatml_string_and_mask() {
        let r = render(&chat(), ChatTemplate::Chatml, true);
        assert_eq!(
            whole(&r),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n See you. <|im_end|>\n"
        );
        assert_eq!(trained(&r), ["Hello!<|im_end|>", " See you. <|im_end|>"]);
        assert!(r.eos_trained);
    }

    #[test]
    fn llama3_string_and_mask() {
        let r = render(&chat(), ChatTemplate::Llama3, true);
        assert_eq!(
            whole(&r),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nSee you.<|eot_id|>"
        );
        assert_eq!(trained(&r), ["Hello!<|eot_id|>", "See you.<|eot_id|>"]);
    }

    #[test]
    fn llama3_names_the_tool_role_ipython() {
        let c = Content::Chat(vec![Message {
            role: Role::Tool,
            content: "42".into(),
        }]);
        let r = render(&c, ChatTemplate::Llama3, true);
        assert_eq!(
            whole(&r),
            "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
        );
    }

    #[test]
    fn plain_concatenates_contents() {
        let r = render(&chat(), ChatTemplate::Plain, true);
        assert_eq!(whole(&r), "Be brief.HiHello!Bye See you. ");
        assert_eq!(trained(&r), ["Hello!", " See you. "]);
    }

    #[test]
    fn no_mask_trains_everything_in_one_piece() {
        for template in [
            ChatTemplate::Chatml,
            ChatTemplate::Llama3,
            ChatTemplate::Plain,
        ] {
            let r = render(&chat(), template, false);
            assert_eq!(r.pieces.len(), 1);
            assert!(r.pieces[0].trained);
        }
    }

    #[test]
    fn eos_follows_the_last_message() {
        let ends_with_user = Content::Chat(vec![Message {
            role: Role::User,
            content: "q".into(),
        }]);
        assert!(!render(&ends_with_user, ChatTemplate::Chatml, true).eos_trained);
        assert!(render(&ends_with_user, ChatTemplate::Chatml, false).eos_trained);
    }

    #[test]
    fn prompt_completion_masks_the_prompt() {
        let c = Content::PromptCompletion {
            prompt: "2+2=".into(),
            completion: "4".into(),
        };
        let r = render(&c, ChatTemplate::Chatml, true);
        assert_eq!(
            r.pieces,
            [
                Piece {
                    text: "2+2=".into(),
                    trained: false
                },
                Piece {
                    text: "4".into(),
                    trained: true
                }
            ]
        );
        let r = render(&c, ChatTemplate::Chatml, false);
        assert_eq!(
            r.pieces,
            [Piece {
                text: "2+2=4".into(),
                trained: true
            }]
        );
    }
}
