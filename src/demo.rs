//! Placeholder until the demo module lands.
pub struct DemoImage;
impl DemoImage {
    #[allow(clippy::should_implement_trait)]
    pub fn default() -> Self {
        DemoImage
    }
    pub fn context_tar(&self) -> Vec<u8> {
        Vec::new()
    }
}
