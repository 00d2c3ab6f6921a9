//! Request chat templates from arbitrary text, rendered as the runtime renders them: in the
//! sandboxed helper process (`infergate-runtime render-templates`, from INFERGATE_RUNTIME_BIN)
//! with its memory, CPU and time limits. Every template renders or is refused; the fuzzing process
//! itself never renders one, so a template bomb shows up as a refusal, not as a crash here.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use runtime::generate::sandbox::{RenderRequest, TemplateSandbox};

fn sandbox() -> &'static (tokio::runtime::Runtime, Arc<TemplateSandbox>) {
    static SANDBOX: OnceLock<(tokio::runtime::Runtime, Arc<TemplateSandbox>)> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let program = std::env::var_os("INFERGATE_RUNTIME_BIN")
            .expect("INFERGATE_RUNTIME_BIN: the infergate-runtime binary whose helpers render");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let render_cpu = runtime::metrics::Metrics::new().template_render_cpu;
        (
            runtime,
            Arc::new(TemplateSandbox::new(program.into(), render_cpu)),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(template) = std::str::from_utf8(data) else {
        return;
    };
    let request = RenderRequest {
        template: template.to_owned(),
        messages: serde_json::from_value(serde_json::json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Hello!"},
        ]))
        .unwrap(),
        add_generation_prompt: true,
        bos_token: "<s>".to_owned(),
        eos_token: "</s>".to_owned(),
    };
    let (runtime, sandbox) = sandbox();
    if let Ok(rendered) = runtime.block_on(sandbox.render(&request)) {
        assert!(rendered.len() <= 1024 * 1024, "the output cap holds");
    }
});
